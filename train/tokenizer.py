"""Tokenizers: the default Mistral v1 SentencePiece model, or the user's own file.

The default is Mistral's v1 SentencePiece model (Apache-2.0; 32,000 pieces, byte fallback,
unk/bos/eos = 0/1/2, the vocabulary size of the GaLore paper's LLaMA configs). It ships inside the
``mistral-common`` wheel on PyPI; it is downloaded once, only that file is kept in the cache,
and its SHA-256 is checked on every load.

A user's tokenizer is a SentencePiece ``.model`` file, a Hugging Face ``tokenizer.json``, or a
pretrained model's ``.gguf`` file: the byte-level BPE its metadata describes, with the model's chat
template (:class:`GGUFTokenizer`).
"""

import datetime
import functools
import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from typing import Any

from train import fetch

MISTRAL_V1_REQUIREMENT = "mistral-common==1.13.1"
MISTRAL_V1_MEMBER = "mistral_common/data/tokenizer.model.v1"
MISTRAL_V1_SHA256 = "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055"
MISTRAL_V1_FILENAME = "mistral-v1.model"

# Special tokens looked up, in this order, in a Hugging Face tokenizer.json.
_HF_EOS_TOKENS = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "[SEP]")
_HF_BOS_TOKENS = ("<s>", "<|begin_of_text|>", "<bos>", "[CLS]")


class SentencePieceTokenizer:
  """A SentencePiece model.

  Attributes:
    name: a short label for logs.
    fingerprint: SHA-256 of the model file, part of the token cache key.
    vocab_size: number of pieces; every id is below it.
    bos_id: id of the beginning-of-sequence piece.
    eos_id: id of the end-of-sequence piece, used to join documents.
  """

  def __init__(self, path: str | os.PathLike, *, name: str | None = None):
    import sentencepiece

    path = pathlib.Path(path)
    self._sp = sentencepiece.SentencePieceProcessor()
    try:
      self._sp.Load(str(path))
    except (OSError, RuntimeError) as e:
      raise ValueError(f"{path} is not a SentencePiece model: {e}") from None
    self.name = name or path.name
    self.fingerprint = fetch.sha256_file(path)
    self.vocab_size = int(self._sp.GetPieceSize())
    self.bos_id = int(self._sp.bos_id())
    self.eos_id = int(self._sp.eos_id())
    if self.eos_id < 0:
      raise ValueError(f"SentencePiece model {path} has no end-of-sequence piece")

  def encode(self, text: str) -> list[int]:
    """Returns the ids of ``text``, without BOS/EOS."""
    return self._sp.Encode(text)

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the ids of each text, without BOS/EOS (in parallel threads)."""
    return self._sp.Encode(list(texts), num_threads=os.cpu_count() or 1)

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of ``ids``."""
    return self._sp.Decode([int(i) for i in ids])


class HuggingFaceTokenizer:
  """A Hugging Face ``tokenizers`` model read from a ``tokenizer.json`` file.

  The end-of-text token is the first of ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``,
  ``<eos>``, ``<|eot_id|>``, ``[SEP]`` that the vocabulary has; the beginning token likewise from
  ``<s>``, ``<|begin_of_text|>``, ``<bos>``, ``[CLS]``, and the end-of-text token if none (GPT-2
  uses one token for both).

  Attributes:
    name: a short label for logs.
    fingerprint: SHA-256 of the JSON file, part of the token cache key.
    vocab_size: size of the vocabulary, added tokens included.
    bos_id: id of the beginning-of-text token.
    eos_id: id of the end-of-text token, used to join documents.
  """

  def __init__(self, path: str | os.PathLike, *, name: str | None = None):
    import tokenizers

    path = pathlib.Path(path)
    # Checked here because tokenizers reports a malformed file as a bare Exception.
    try:
      spec = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("model"), dict):
      raise ValueError(f"{path} is not a Hugging Face tokenizer.json: no \"model\" object")
    self._tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    self.name = name or path.name
    self.fingerprint = fetch.sha256_file(path)
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    eos = self._first_token(_HF_EOS_TOKENS)
    if eos is None:
      raise ValueError(f"tokenizer {path} has no end-of-text token "
                       f"(looked for {', '.join(_HF_EOS_TOKENS)})")
    bos = self._first_token(_HF_BOS_TOKENS)
    self.eos_id = eos
    self.bos_id = eos if bos is None else bos

  def _first_token(self, candidates: Sequence[str]) -> int | None:
    for token in candidates:
      token_id = self._tok.token_to_id(token)
      if token_id is not None:
        return int(token_id)
    return None

  def encode(self, text: str) -> list[int]:
    """Returns the ids of ``text``, without special tokens."""
    return self._tok.encode(text, add_special_tokens=False).ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    """Returns the ids of each text, without special tokens (in parallel threads)."""
    return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Returns the text of ``ids``."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


GGUF_MAGIC = b"GGUF"

# llama.cpp's token types (tokenizer.ggml.token_type) that become added tokens.
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# llama.cpp's pre-tokenizer names (tokenizer.ggml.pre) by how they split text before BPE. The
# "digits" family runs the regex \p{N} first, so every digit is a piece of its own, then GPT-2's
# regex on the rest; the "gpt2" family runs GPT-2's regex alone.
_PRE_DIGITS = ("smollm", "starcoder", "refact", "codeshell", "command-r")
_PRE_GPT2 = ("gpt2", "gpt-2", "mpt", "olmo")


def _byte_level_pre_tokenizer(pre: str | None, path: pathlib.Path) -> Any:
  """The ``tokenizers`` pre-tokenizer that splits text as llama.cpp's ``pre`` does."""
  from tokenizers import pre_tokenizers

  byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  if pre in _PRE_DIGITS:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
  if pre in _PRE_GPT2 or pre is None:
    return byte_level
  raise ValueError(f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported; "
                   f"supported: {', '.join(_PRE_DIGITS + _PRE_GPT2)}")


def _template_exception(message: str):
  from jinja2.exceptions import TemplateError

  raise TemplateError(message)


def _template_tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
                     separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
  # Plain JSON: Jinja's own tojson escapes <, >, & and ' for HTML, which a prompt must not see.
  return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
  return datetime.datetime.now().strftime(fmt)


@functools.lru_cache(maxsize=8)
def _compile_chat_template(source: str) -> Any:
  """A chat template compiled in a sandbox, with the helpers chat templates expect."""
  from jinja2.ext import loopcontrols
  from jinja2.sandbox import ImmutableSandboxedEnvironment

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[loopcontrols])
  env.filters["tojson"] = _template_tojson
  env.globals["raise_exception"] = _template_exception
  env.globals["strftime_now"] = _strftime_now
  return env.from_string(source)


class GGUFTokenizer(HuggingFaceTokenizer):
  """The byte-level BPE tokenizer and chat template stored in a GGUF model file.

  Built with the ``tokenizers`` library from the file's metadata
  (:class:`models.gguf.GGUFTokenizerMetadata`): the vocabulary
  (``tokenizer.ggml.tokens``, ids by position), the merges, llama.cpp's
  pre-tokenizer (``tokenizer.ggml.pre``: for ``"smollm"`` every digit is split
  off before GPT-2's regex, as SmolLM2's own tokenizer and llama.cpp do), a
  byte-level decoder, and the tokens typed *control* (``<|im_start|>``, ...) as
  special tokens that are matched whole in text. :meth:`encode` adds no BOS/EOS.

  Attributes:
    name: the file name.
    fingerprint: SHA-256 of the tokenizer's JSON serialisation and chat template.
    vocab_size: number of tokens.
    bos_id, eos_id: from the file (``eos_id`` falls back to the first end-of-text token
      the vocabulary has; ``bos_id`` to ``eos_id``).
    pad_id: the padding id from the file, else ``eos_id``.
    stop_ids: ids that end a generated turn: ``eos_id`` and the file's
      end-of-turn / end-of-message ids (for :func:`models.generate`'s ``eos_ids``).
    chat_template: the Jinja template source, or ``None``.
    special_tokens: ``{"bos_token": ..., "eos_token": ..., "unk_token": ..., "pad_token": ...}``
      (strings; absent ones are ``None``), as the chat template sees them.
    metadata: the :class:`models.gguf.GGUFTokenizerMetadata` it was built from.
  """

  def __init__(self, path: str | os.PathLike, *, name: str | None = None):
    import tokenizers
    from tokenizers import decoders

    from models import gguf as gguf_lib

    path = pathlib.Path(path)
    meta = gguf_lib.load_gguf_tokenizer_metadata(path)
    if meta.model != "gpt2":
      raise ValueError(f"{path}: tokenizer model {meta.model!r} (tokenizer.ggml.model) is not "
                       "supported; only byte-level BPE ('gpt2')")
    if not meta.merges:
      raise ValueError(f"{path}: the file has no tokenizer.ggml.merges")
    vocab = {token: index for index, token in enumerate(meta.tokens)}
    if len(vocab) != len(meta.tokens):
      raise ValueError(f"{path}: tokenizer.ggml.tokens holds duplicate tokens")
    merges = []
    for merge in meta.merges:
      pair = tuple(merge.split(" "))
      if len(pair) != 2:
        raise ValueError(f"{path}: malformed merge {merge!r} in tokenizer.ggml.merges")
      merges.append(pair)
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges, fuse_unk=False))
    tok.pre_tokenizer = _byte_level_pre_tokenizer(meta.pre, path)
    tok.decoder = decoders.ByteLevel()
    added = {_TOKEN_TYPE_CONTROL: True, _TOKEN_TYPE_USER_DEFINED: False}
    special = [tokenizers.AddedToken(token, special=added[kind], normalized=False)
               for token, kind in zip(meta.tokens, meta.token_types) if kind in added]
    tok.add_special_tokens([t for t in special if t.special])
    tok.add_tokens([t for t in special if not t.special])
    if tok.get_vocab_size(with_added_tokens=True) != len(meta.tokens):
      raise ValueError(f"{path}: the added tokens do not all belong to the vocabulary")
    self._tok = tok
    self.metadata = meta
    self.name = name or path.name
    self.chat_template = meta.chat_template
    self.fingerprint = fetch.sha256_bytes(
        (tok.to_str() + "\0" + (meta.chat_template or "")).encode("utf-8"))
    self.vocab_size = len(meta.tokens)
    eos = meta.eos_id if meta.eos_id is not None else self._first_token(_HF_EOS_TOKENS)
    if eos is None:
      raise ValueError(f"{path}: no end-of-text token (tokenizer.ggml.eos_token_id)")
    self.eos_id = eos
    self.bos_id = meta.bos_id if meta.bos_id is not None else eos
    self.pad_id = meta.pad_id if meta.pad_id is not None else eos
    self.stop_ids = tuple(sorted({i for i in (eos, meta.eot_id, meta.eom_id) if i is not None}))
    ids = {"bos_token": meta.bos_id, "eos_token": eos, "unk_token": meta.unk_id,
           "pad_token": meta.pad_id}
    self.special_tokens = {key: None if i is None else meta.tokens[i] for key, i in ids.items()}

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    """Returns the text of ``ids``; ``skip_special_tokens`` drops control tokens."""
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(
      self,
      messages: Sequence[Mapping[str, Any]],
      *,
      add_generation_prompt: bool = False,
      tokenize: bool = True,
      **template_kwargs: Any,
  ) -> list[int] | str:
    """Renders a conversation with the model's chat template, as ``transformers`` does.

    The template is Jinja, rendered in a sandbox with ``trim_blocks`` and
    ``lstrip_blocks``, the ``loopcontrols`` extension, a plain-JSON ``tojson``
    filter, and the globals ``raise_exception(message)`` and
    ``strftime_now(format)``. It sees ``messages``, ``add_generation_prompt``,
    ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` and every extra
    keyword argument (e.g. ``tools=[...]``).

    Args:
      messages: ``[{"role": "system" | "user" | "assistant", "content": str}, ...]``.
      add_generation_prompt: append the header that starts the assistant's turn.
      tokenize: return token ids (the default, as in ``transformers``) rather
        than the rendered text; ids are :meth:`encode` of the text (no BOS added:
        the template writes what the model expects).
      **template_kwargs: further variables for the template.

    Returns:
      The ids, or the text when ``tokenize=False``.

    Raises:
      ValueError: the file has no chat template.
      jinja2.TemplateError: the template rejects the conversation.
    """
    if self.chat_template is None:
      raise ValueError(f"{self.name} has no chat template (tokenizer.chat_template)")
    context = {**self.special_tokens, **template_kwargs}
    text = _compile_chat_template(self.chat_template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **context)
    return self.encode(text) if tokenize else text


def is_gguf_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a file that starts with GGUF's magic bytes."""
  try:
    with open(path, "rb") as f:
      return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC
  except OSError:
    return False


Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer | GGUFTokenizer


def fetch_mistral_v1(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """Returns the path of the cached Mistral v1 SentencePiece model, downloading it if needed.

  The file is taken from the ``mistral-common==1.13.1`` wheel and checked against a recorded
  SHA-256; a cached copy that fails the check is downloaded again.

  Args:
    cache_dir: the cache directory (see :func:`train.fetch.resolve_cache_dir`).

  Returns:
    The path of ``tokenizers/mistral-v1.model`` in the cache.

  Raises:
    FetchError: the wheel could not be downloaded.
    ValueError: the downloaded file does not have the recorded SHA-256.
  """
  path = fetch.resolve_cache_dir(cache_dir) / "tokenizers" / MISTRAL_V1_FILENAME
  if path.is_file() and fetch.sha256_file(path) == MISTRAL_V1_SHA256:
    return path
  with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
    wheel = fetch.pip_download(MISTRAL_V1_REQUIREMENT, pathlib.Path(tmp), sdist=False)
    try:
      with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MISTRAL_V1_MEMBER)
    except (KeyError, zipfile.BadZipFile) as e:
      raise ValueError(f"{wheel.name} does not hold {MISTRAL_V1_MEMBER}: {e}") from None
  digest = fetch.sha256_bytes(data)
  if digest != MISTRAL_V1_SHA256:
    raise ValueError(f"{MISTRAL_V1_MEMBER} from {MISTRAL_V1_REQUIREMENT} has SHA-256 {digest}, "
                     f"expected {MISTRAL_V1_SHA256}")
  fetch.write_atomic(path, data)
  return path


def load_tokenizer(path: str | os.PathLike | None = None,
                   cache_dir: str | os.PathLike | None = None) -> Tokenizer:
  """Loads a tokenizer.

  Args:
    path: ``None`` for the default Mistral v1 model (fetched into the cache on first use); a
      SentencePiece ``.model`` file; a Hugging Face ``tokenizer.json`` (any ``.json`` file); a
      GGUF model file (``.gguf``, or any file with GGUF's magic bytes), whose byte-level BPE and
      chat template give a :class:`GGUFTokenizer`; or a directory holding ``tokenizer.model``
      or ``tokenizer.json``.
    cache_dir: the cache directory for the default model.

  Returns:
    A tokenizer with ``vocab_size``, ``bos_id``, ``eos_id``, ``encode(str) -> list[int]``,
    ``encode_batch(list[str])``, ``decode(ids) -> str``, ``name`` and ``fingerprint``; a
    :class:`GGUFTokenizer` also has ``apply_chat_template``, ``stop_ids`` and ``pad_id``.

  Raises:
    FileNotFoundError: the path does not exist, or the default could not be downloaded.
    ValueError: the file is not a tokenizer this function can read.

  Examples:
    >>> tok = load_tokenizer()  # doctest: +SKIP
    >>> tok.vocab_size, tok.bos_id, tok.eos_id  # doctest: +SKIP
    (32000, 1, 2)
  """
  if path is None:
    try:
      return SentencePieceTokenizer(fetch_mistral_v1(cache_dir), name="mistral-v1")
    except fetch.FetchError as e:
      raise fetch.FetchError(f"{e} (the default tokenizer; pass --tokenizer PATH to use a local "
                             "one)") from None
  path = pathlib.Path(path).expanduser()
  if path.is_dir():
    for candidate in ("tokenizer.model", "tokenizer.json"):
      if (path / candidate).is_file():
        path = path / candidate
        break
    else:
      raise FileNotFoundError(f"tokenizer directory {path} holds no tokenizer.model or "
                              "tokenizer.json")
  if not path.is_file():
    raise FileNotFoundError(f"tokenizer file not found: {path}")
  if path.suffix == ".json":
    return HuggingFaceTokenizer(path)
  if path.suffix == ".gguf" or is_gguf_file(path):
    return GGUFTokenizer(path)
  return SentencePieceTokenizer(path)
