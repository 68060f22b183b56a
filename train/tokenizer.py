"""Tokenizers: the default Mistral v1 SentencePiece model, or the user's own file.

The default is Mistral's v1 SentencePiece model (Apache-2.0; 32,000 pieces, byte fallback,
unk/bos/eos = 0/1/2, the vocabulary size of the GaLore paper's LLaMA configs). It ships inside the
``mistral-common`` wheel on PyPI; it is downloaded once, only that file is kept in the cache,
and its SHA-256 is checked on every load.

A user's tokenizer is either a SentencePiece ``.model`` file or a Hugging Face ``tokenizer.json``.
"""

import json
import os
import pathlib
import tempfile
import zipfile
from collections.abc import Sequence

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


Tokenizer = SentencePieceTokenizer | HuggingFaceTokenizer


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
      SentencePiece ``.model`` file; a Hugging Face ``tokenizer.json`` (any ``.json`` file); or a
      directory holding ``tokenizer.model`` or ``tokenizer.json``.
    cache_dir: the cache directory for the default model.

  Returns:
    A tokenizer with ``vocab_size``, ``bos_id``, ``eos_id``, ``encode(str) -> list[int]``,
    ``encode_batch(list[str])``, ``decode(ids) -> str``, ``name`` and ``fingerprint``.

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
  return SentencePieceTokenizer(path)
