"""LLaMA models and their tokenizer metadata from GGUF files (llama.cpp's format).

Files are read with the ``gguf`` package; quantised tensors (Q4_1, Q8_0, ...)
are dequantised to float32 with ``gguf.quants.dequantize`` and then cast to the
config's ``param_dtype``. Nothing here downloads anything: fetching a file is
the trainer's job (``train.pretrained``).

GGUF stores a matrix as numpy ``(out, in)``, like Hugging Face's ``nn.Linear``,
so the kernels here (``(in, out)``) are transposed on the way in. One more
difference: llama.cpp's converter permutes the rows of the query and key
projections of every head from Hugging Face's "rotate half" RoPE layout
(feature ``i`` paired with ``i + head_dim / 2``) to the adjacent-pair layout
that llama.cpp rotates (feature ``2i`` paired with ``2i + 1``).
:func:`unpermute_rotary` undoes it, per query head for ``attn_q`` and per
key/value head for ``attn_k``; without it the logits are wrong while every
shape is right.

=====================================  ===================================  ====================
GGUF tensor                            params path                          on the way in
=====================================  ===================================  ====================
token_embd.weight                      embed/embedding                      as is
blk.{i}.attn_norm.weight               blocks/{i}/attn_norm/scale           as is
blk.{i}.attn_q.weight                  blocks/{i}/attn/q/kernel             unpermute, transpose
blk.{i}.attn_k.weight                  blocks/{i}/attn/k/kernel             unpermute, transpose
blk.{i}.attn_{v,output}.weight         blocks/{i}/attn/{v,o}/kernel         transpose
blk.{i}.ffn_norm.weight                blocks/{i}/mlp_norm/scale            as is
blk.{i}.ffn_{gate,up,down}.weight      blocks/{i}/mlp/{gate,up,down}/kernel transpose
output_norm.weight                     final_norm/scale                     as is
output.weight (absent: tied)           lm_head/kernel                       transpose
=====================================  ===================================  ====================
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import llama

__all__ = [
    "GGUFTokenizerMetadata",
    "config_from_gguf_metadata",
    "load_gguf_config",
    "load_gguf_llama",
    "load_gguf_tokenizer_metadata",
    "read_gguf_metadata",
    "unpermute_rotary",
]

ARCHITECTURE = "llama"


def _open(path: str | os.PathLike[str]) -> gguf.GGUFReader:
  """A reader for ``path``, with the two foreseeable failures named.

  ``gguf.GGUFReader`` parses all metadata up front, element by element (seconds
  for a 49k-token vocabulary), so the last readers are kept, keyed by the
  file's identity and modification time: loading a model and then its
  tokenizer parses the file once.
  """
  path = os.path.realpath(os.fspath(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"GGUF file not found: {path}")
  stat = os.stat(path)
  return _cached_reader(path, stat.st_size, stat.st_mtime_ns, stat.st_ino)


@functools.lru_cache(maxsize=2)
def _cached_reader(path: str, size: int, mtime_ns: int, inode: int) -> gguf.GGUFReader:
  del size, mtime_ns, inode  # the cache key only
  try:
    return gguf.GGUFReader(path)
  except ValueError as e:  # gguf reports a wrong magic number or version as ValueError
    raise ValueError(f"{path} is not a readable GGUF file: {e}") from None


def _field_value(field: Any) -> Any:
  """A metadata field as a Python value; float32 scalars as their shortest decimal.

  A converter writes ``rms_norm_eps = 1e-5`` as the float32 nearest to it; read
  back as a Python float that is ``9.999999747378752e-06``. ``str`` of a numpy
  float32 is the shortest decimal that rounds to the same float32, so the
  config holds the value the model was published with.
  """
  value = field.contents()
  if field.types == [gguf.GGUFValueType.FLOAT32]:
    value = float(str(np.float32(value)))
  return value


def _metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
  return {name: _field_value(field) for name, field in reader.fields.items()
          if not name.startswith("GGUF.")}


def read_gguf_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
  """Every key/value pair of a GGUF file's metadata, as Python values.

  Arrays come back as lists (the tokenizer's 49k tokens included), float32
  scalars as their shortest decimal (see the module doc). The file's own
  header fields (``GGUF.version``, counts) are left out.

  Raises:
    FileNotFoundError: no such file.
    ValueError: the file is not GGUF.
  """
  return _metadata(_open(path))


def config_from_gguf_metadata(
    metadata: Mapping[str, Any],
    tensor_names: set[str] | frozenset[str] | None = None,
    **overrides: Any,
) -> llama.LlamaConfig:
  """Builds a :class:`~models.llama.LlamaConfig` from GGUF metadata.

  Args:
    metadata: from :func:`read_gguf_metadata`.
    tensor_names: the file's tensor names; the embeddings are tied when there
      is no ``output.weight``. ``None`` means tied.
    **overrides: fields to set on the result (``dtype``, ``param_dtype``, ...).

  Returns:
    The config (float32 by default).

  Raises:
    ValueError: the file is not a LLaMA model, or a required key is missing.
    NotImplementedError: a feature this model does not implement (RoPE scaling,
      experts, a head width other than ``hidden / heads``).

  Examples:
    >>> meta = {"general.architecture": "llama", "llama.block_count": 2,
    ...         "llama.embedding_length": 64, "llama.feed_forward_length": 96,
    ...         "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
    ...         "llama.context_length": 128, "llama.rope.freq_base": 5e4,
    ...         "llama.attention.layer_norm_rms_epsilon": 1e-5, "llama.vocab_size": 100}
    >>> cfg = config_from_gguf_metadata(meta, {"token_embd.weight", "output.weight"})
    >>> cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta, cfg.tie_word_embeddings
    (2, 16, 50000.0, False)
  """
  arch = metadata.get("general.architecture")
  if arch != ARCHITECTURE:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; expected {ARCHITECTURE!r}")

  def get(key: str, default: Any = KeyError) -> Any:
    value = metadata.get(f"{arch}.{key}", default)
    if value is KeyError:
      raise ValueError(f"GGUF metadata has no {arch}.{key}")
    return value

  scaling = get("rope.scaling.type", "none")
  if scaling not in ("none", None):
    raise NotImplementedError(f"RoPE scaling {scaling!r} is not implemented; only plain RoPE")
  if get("expert_count", 0):
    raise NotImplementedError("mixture-of-experts LLaMA files are not implemented")
  hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
  head_dim = hidden // heads
  for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
    value = get(key, head_dim)
    if value != head_dim:
      raise NotImplementedError(f"{arch}.{key}={value} differs from embedding_length / "
                                f"head_count = {head_dim}; not implemented")
  vocab = get("vocab_size", None)
  if vocab is None:
    tokens = metadata.get("tokenizer.ggml.tokens")
    if tokens is None:
      raise ValueError(f"GGUF metadata has neither {arch}.vocab_size nor tokenizer.ggml.tokens")
    vocab = len(tokens)
  config = llama.LlamaConfig(
      vocab_size=int(vocab),
      hidden_size=hidden,
      intermediate_size=int(get("feed_forward_length")),
      num_layers=int(get("block_count")),
      num_heads=heads,
      num_kv_heads=int(get("attention.head_count_kv", heads)),
      max_position_embeddings=int(get("context_length")),
      rope_theta=float(get("rope.freq_base", 10000.0)),
      rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")),
      tie_word_embeddings=tensor_names is None or "output.weight" not in tensor_names,
  )
  return dataclasses.replace(config, **overrides)


def load_gguf_config(path: str | os.PathLike[str], **overrides: Any) -> llama.LlamaConfig:
  """The :class:`~models.llama.LlamaConfig` of a GGUF file (reads metadata only).

  See :func:`config_from_gguf_metadata` for the arguments and errors.
  """
  reader = _open(path)
  return config_from_gguf_metadata(_metadata(reader), {t.name for t in reader.tensors},
                                   **overrides)


def unpermute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's RoPE row permutation of a query or key matrix.

  Within each head of ``head_dim`` rows, GGUF row ``2i + j`` (``j`` in 0, 1) is
  Hugging Face row ``j * head_dim / 2 + i``: the pair that rotate-half RoPE
  rotates together, ``(i, i + head_dim / 2)``, sits at adjacent rows
  ``(2i, 2i + 1)``, where llama.cpp rotates it.

  Args:
    weight: ``(num_heads * head_dim, in)`` rows as stored in the GGUF file
      (numpy's view of llama.cpp's ``[in, out]`` tensor).
    num_heads: query heads for ``attn_q``, key/value heads for ``attn_k``.

  Returns:
    The same matrix with rows in Hugging Face's order.

  Examples:
    >>> import numpy as np
    >>> rows = np.arange(8)[:, None]  # one head of width 8, labelled by row
    >>> unpermute_rotary(rows, num_heads=1).ravel().tolist()
    [0, 2, 4, 6, 1, 3, 5, 7]
  """
  out = weight.shape[0]
  if out % (2 * num_heads):
    raise ValueError(f"{out} rows do not split into {num_heads} heads of even width")
  pairs = weight.reshape(num_heads, out // num_heads // 2, 2, *weight.shape[1:])
  return pairs.swapaxes(1, 2).reshape(weight.shape)


def _tensor_map(config: llama.LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool, int]]:
  """``{gguf name: (params path, transposed, heads to unpermute or 0)}``."""
  names: dict[str, tuple[tuple[Any, ...], bool, int]] = {
      "token_embd.weight": (("embed", "embedding"), False, 0),
      "output_norm.weight": (("final_norm", "scale"), False, 0),
  }
  if not config.tie_word_embeddings:
    names["output.weight"] = (("lm_head", "kernel"), True, 0)
  for i in range(config.num_layers):
    block = ("blocks", i)
    names.update({
        f"blk.{i}.attn_norm.weight": (block + ("attn_norm", "scale"), False, 0),
        f"blk.{i}.attn_q.weight": (block + ("attn", "q", "kernel"), True, config.num_heads),
        f"blk.{i}.attn_k.weight": (block + ("attn", "k", "kernel"), True, config.num_kv_heads),
        f"blk.{i}.attn_v.weight": (block + ("attn", "v", "kernel"), True, 0),
        f"blk.{i}.attn_output.weight": (block + ("attn", "o", "kernel"), True, 0),
        f"blk.{i}.ffn_norm.weight": (block + ("mlp_norm", "scale"), False, 0),
        f"blk.{i}.ffn_gate.weight": (block + ("mlp", "gate", "kernel"), True, 0),
        f"blk.{i}.ffn_up.weight": (block + ("mlp", "up", "kernel"), True, 0),
        f"blk.{i}.ffn_down.weight": (block + ("mlp", "down", "kernel"), True, 0),
    })
  return names


def load_gguf_llama(path: str | os.PathLike[str], **overrides: Any) -> llama.Llama:
  """Loads a LLaMA-architecture GGUF file into a :class:`~models.llama.Llama`.

  The config comes from the file's metadata (:func:`config_from_gguf_metadata`:
  layers, widths, grouped key/value heads, RoPE base, RMSNorm epsilon, tied
  embeddings when the file has no ``output.weight``); tensors are dequantised
  to float32, the query/key rows unpermuted (:func:`unpermute_rotary`), the
  matrices transposed to ``(in, out)``, and everything cast to ``param_dtype``.

  Args:
    path: the ``.gguf`` file.
    **overrides: :class:`~models.llama.LlamaConfig` fields to set, e.g.
      ``dtype="bfloat16"``, ``param_dtype="bfloat16"``, ``remat=True``.

  Returns:
    The model, ready to call; its config is ``model.config``.

  Raises:
    FileNotFoundError: no such file.
    ValueError: not a GGUF file, not a LLaMA architecture, or tensors missing,
      unexpected or of the wrong shape.
    NotImplementedError: a LLaMA variant this model does not implement.
  """
  reader = _open(path)
  tensors = {t.name: t for t in reader.tensors}
  config = config_from_gguf_metadata(_metadata(reader), frozenset(tensors), **overrides)
  expected = _tensor_map(config)
  missing = sorted(set(expected) - set(tensors))
  unexpected = sorted(set(tensors) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{os.fspath(path)} does not match a {ARCHITECTURE} model of its own "
                     f"metadata: missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}"
                     f", unexpected {unexpected[:8]}{'...' if len(unexpected) > 8 else ''}")
  _, abstract = llama.abstract_params(config)
  params: dict[str, Any] = {}
  for name, (path_in_params, transposed, heads) in expected.items():
    tensor = tensors[name]
    array = np.asarray(gguf.quants.dequantize(tensor.data, tensor.tensor_type), np.float32)
    # llama.cpp lists dimensions innermost first: ne = [in, out] is numpy's (out, in).
    array = array.reshape(tuple(int(n) for n in reversed(tensor.shape)))
    if heads:
      array = unpermute_rotary(array, heads)
    if transposed:
      array = array.T
    want = abstract
    for key in path_in_params:
      want = want[key]
    if tuple(array.shape) != tuple(want.shape):
      raise ValueError(f"tensor {name}: shape {tuple(array.shape)} (after transpose: "
                       f"{transposed}) does not match {tuple(want.shape)} from the metadata")
    node = params
    for key in path_in_params[:-1]:
      node = node.setdefault(key, {})
    node[path_in_params[-1]] = jnp.asarray(array, dtype=want.dtype)
  graphdef, _ = llama.abstract_params(config)
  return nnx.merge(graphdef, params)


@dataclasses.dataclass(frozen=True, eq=False)
class GGUFTokenizerMetadata:
  """The tokenizer a GGUF file describes, as stored under ``tokenizer.*``.

  Attributes:
    model: ``tokenizer.ggml.model``; ``"gpt2"`` is a byte-level BPE.
    pre: ``tokenizer.ggml.pre``, llama.cpp's name for the pre-tokenizer
      (how text is split before BPE), e.g. ``"smollm"``; ``None`` if absent.
    tokens: the vocabulary, by id (byte-level spelling for ``"gpt2"``).
    token_types: llama.cpp's type per token (1 normal, 3 control, 4 user-defined, ...).
    merges: BPE merges, ``"left right"``, best first.
    bos_id, eos_id, unk_id, pad_id: special token ids (``None`` if absent).
    eot_id, eom_id: end-of-turn / end-of-message ids (``None`` if absent).
    add_bos, add_eos: whether llama.cpp adds BOS / EOS when encoding.
    chat_template: the Jinja chat template, or ``None``.
  """

  model: str
  pre: str | None
  tokens: tuple[str, ...]
  token_types: tuple[int, ...]
  merges: tuple[str, ...]
  bos_id: int | None
  eos_id: int | None
  unk_id: int | None
  pad_id: int | None
  eot_id: int | None
  eom_id: int | None
  add_bos: bool
  add_eos: bool
  chat_template: str | None

  @classmethod
  def from_metadata(cls, metadata: Mapping[str, Any]) -> GGUFTokenizerMetadata:
    """Reads the ``tokenizer.*`` keys of :func:`read_gguf_metadata`'s result.

    Raises:
      ValueError: the metadata has no ``tokenizer.ggml.model`` or ``tokenizer.ggml.tokens``.
    """
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.tokens"):
      if key not in metadata:
        raise ValueError(f"GGUF metadata has no {key}: the file carries no tokenizer")
    tokens = tuple(metadata["tokenizer.ggml.tokens"])
    types = tuple(int(t) for t in metadata.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    if len(types) != len(tokens):
      raise ValueError(f"tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} "
                       "tokens")

    def token_id(name: str) -> int | None:
      value = metadata.get(f"tokenizer.ggml.{name}_token_id")
      if value is None:
        return None
      if not 0 <= int(value) < len(tokens):
        raise ValueError(f"tokenizer.ggml.{name}_token_id={value} is outside the vocabulary "
                         f"of {len(tokens)}")
      return int(value)

    return cls(
        model=str(metadata["tokenizer.ggml.model"]),
        pre=metadata.get("tokenizer.ggml.pre"),
        tokens=tokens,
        token_types=types,
        merges=tuple(metadata.get("tokenizer.ggml.merges", ())),
        bos_id=token_id("bos"),
        eos_id=token_id("eos"),
        unk_id=token_id("unknown"),
        pad_id=token_id("padding"),
        eot_id=token_id("eot"),
        eom_id=token_id("eom"),
        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
        add_eos=bool(metadata.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=metadata.get("tokenizer.chat_template"),
    )


def load_gguf_tokenizer_metadata(path: str | os.PathLike[str]) -> GGUFTokenizerMetadata:
  """The tokenizer metadata of a GGUF file (see :class:`GGUFTokenizerMetadata`).

  Building a tokenizer from it is ``train.tokenizer.load_tokenizer(path)``.
  """
  return GGUFTokenizerMetadata.from_metadata(read_gguf_metadata(path))
