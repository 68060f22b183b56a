"""A Flax NNX BERT encoder, Hugging Face BERT checkpoints, and a sentence-classification head.

:class:`Bert` is the encoder of Devlin et al. (2019) as Hugging Face's ``BertModel`` computes it:
the sum of token, absolute-position and token-type embeddings, LayerNorm, then ``num_layers``
post-LayerNorm blocks

.. math::
  h = \\mathrm{LN}(x + \\mathrm{Attn}(x)), \\qquad y = \\mathrm{LN}(h + W_2\\,\\mathrm{GELU}(W_1 h))

with bidirectional multi-head attention that ignores the padding keys (``attention_mask`` 0) and
the exact (erf) GELU. Every dense layer has a bias. Calling the model returns the last hidden
states, ``[batch, seq, hidden]``; :meth:`Bert.pool` is ``BertModel``'s pooler (dense + tanh of the
``[CLS]`` state) when the checkpoint has one.

:class:`BertClassifier` puts a linear head on a pooled sentence vector: the ``[CLS]`` state
(``"cls"``) or the mean of the hidden states over the attention mask (``"mean"``, how
sentence-transformers models such as all-MiniLM-L6-v2 were trained).

Parameters (the nested dict of :func:`split_params`; kernels are ``(in, out)``):

===============================================  ==========================================
Hugging Face name (``bert.`` prefix optional)    params path
===============================================  ==========================================
embeddings.word_embeddings.weight                embed/word/embedding
embeddings.position_embeddings.weight            embed/position/embedding
embeddings.token_type_embeddings.weight          embed/token_type/embedding
embeddings.LayerNorm.{weight,bias}               embed/norm/{scale,bias}
encoder.layer.{i}.attention.self.query (T)       layers/{i}/attn/q/{kernel,bias}
encoder.layer.{i}.attention.self.key (T)         layers/{i}/attn/k/{kernel,bias}
encoder.layer.{i}.attention.self.value (T)       layers/{i}/attn/v/{kernel,bias}
encoder.layer.{i}.attention.output.dense (T)     layers/{i}/attn/o/{kernel,bias}
encoder.layer.{i}.attention.output.LayerNorm     layers/{i}/attn_norm/{scale,bias}
encoder.layer.{i}.intermediate.dense (T)         layers/{i}/mlp/up/{kernel,bias}
encoder.layer.{i}.output.dense (T)               layers/{i}/mlp/down/{kernel,bias}
encoder.layer.{i}.output.LayerNorm               layers/{i}/mlp_norm/{scale,bias}
pooler.dense (T; optional)                       pooler/{kernel,bias}
===============================================  ==========================================

The projections are named like LLaMA's (``q``, ``k``, ``v``, ``o``, ``up``, ``down``), so
:func:`galore_mask` selects the same leaves ``models.llama.galore_mask`` would: the attention
and feed-forward kernels, not the embeddings, norms, biases, pooler or classification head.

References:
  Devlin et al., `BERT: Pre-training of Deep Bidirectional Transformers for Language
  Understanding <https://arxiv.org/abs/1810.04805>`_, 2019
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
POOLINGS = ("cls", "mean")
#: The modules whose kernels GaLore projects (and LoRA adapts).
PROJECTED_MODULES = frozenset({"q", "k", "v", "o", "up", "down"})

# BERT's initializer: N(0, 0.02) for every matrix and embedding; biases 0, LayerNorm (1, 0).
_INIT_STD = 0.02
_IGNORED = re.compile(r"(^|\.)position_ids$")


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Shapes of a BERT encoder (the fields of Hugging Face's ``BertConfig`` it uses).

  Attributes:
    vocab_size: token ids are in ``[0, vocab_size)``.
    hidden_size: model width ``d``.
    intermediate_size: feed-forward width.
    num_layers: number of encoder blocks.
    num_heads: attention heads; must divide ``hidden_size``.
    max_position_embeddings: longest sequence the model accepts.
    type_vocab_size: number of token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    pooler: whether the model has ``BertModel``'s pooler (dense + tanh on ``[CLS]``).
    dtype: compute dtype of activations and matmuls.
    param_dtype: storage dtype of the parameters.

  Examples:
    >>> BertConfig(hidden_size=384, num_heads=12).head_dim
    32
  """

  vocab_size: int = 30522
  hidden_size: int = 768
  intermediate_size: int = 3072
  num_layers: int = 12
  num_heads: int = 12
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  pooler: bool = True
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    for name in ("dtype", "param_dtype"):
      dtype = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"`{name}` must be a float dtype, got {dtype}")
      object.__setattr__(self, name, dtype.name)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "max_position_embeddings", "type_vocab_size"):
      if getattr(self, name) < 1:
        raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"`hidden_size` {self.hidden_size} is not a multiple of `num_heads` "
                       f"{self.num_heads}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``hidden_size // num_heads``."""
    return self.hidden_size // self.num_heads

  def num_params(self) -> int:
    """Number of encoder parameters (pooler included when present), counted analytically."""
    d, f = self.hidden_size, self.intermediate_size
    embed = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * d + 2 * d
    block = 4 * (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    return embed + self.num_layers * block + (d * d + d if self.pooler else 0)

  def num_matmul_params(self) -> int:
    """Kernel weights used in the blocks' matmuls (embedding lookups are gathers)."""
    d, f = self.hidden_size, self.intermediate_size
    return self.num_layers * (4 * d * d + 2 * d * f)

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward and backward) at sequence length ``seq_len``.

    ``6 N_matmul + 12 L H d_head T``, as ``models.llama.LlamaConfig.flops_per_token`` counts
    them (the full ``T x T`` attention square).
    """
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return float(6 * self.num_matmul_params() + attention)


#: all-MiniLM-L6-v2's shapes (sentence-transformers; 22.7 M parameters).
MINILM_L6 = BertConfig(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  """LayerNorm over the last axis with float32 statistics; the result is float32."""
  x = x.astype(jnp.float32)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return ((x - mean) * jax.lax.rsqrt(var + eps) * scale.astype(jnp.float32)
          + bias.astype(jnp.float32))


def bidirectional_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                            mask: jax.Array) -> jax.Array:
  """Scaled dot-product attention in which every query sees every unmasked key.

  Args:
    q: queries, ``[batch, seq, heads, head_dim]``.
    k: keys, same shape.
    v: values, same shape.
    mask: ``[batch, seq]``, nonzero for the keys that may be attended to (the real tokens).

  Returns:
    ``[batch, seq, heads * head_dim]`` in the dtype of ``v``. Scores and softmax are float32.
  """
  batch, seq, heads, head_dim = q.shape
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(head_dim)
  scores = jnp.where(mask[:, None, None, :] != 0, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", probs, v).reshape(batch, seq, heads * head_dim)


class Dense(nnx.Module):
  """A dense layer with a 2-D ``(in, out)`` ``kernel`` and a ``bias``."""

  def __init__(self, in_features: int, out_features: int, *, dtype: Any, param_dtype: Any,
               rngs: nnx.Rngs):
    init = nnx.initializers.normal(_INIT_STD)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
    return y + self.bias[...].astype(self.dtype)


class LayerNorm(nnx.Module):
  """LayerNorm with a learned ``scale`` (ones) and ``bias`` (zeros); see :func:`layer_norm`."""

  def __init__(self, features: int, *, eps: float, dtype: Any, param_dtype: Any):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.bias = nnx.Param(jnp.zeros((features,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return layer_norm(x, self.scale[...], self.bias[...], self.eps).astype(self.dtype)


class Embedding(nnx.Module):
  """An embedding table ``(num, features)``."""

  def __init__(self, num: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
    init = nnx.initializers.normal(_INIT_STD)
    self.embedding = nnx.Param(init(rngs.params(), (num, features), param_dtype))
    self.dtype = dtype

  def __call__(self, ids: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class Embeddings(nnx.Module):
  """Token + position + token-type embeddings, then LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    d = config.hidden_size
    self.word = Embedding(config.vocab_size, d, **kw)
    self.position = Embedding(config.max_position_embeddings, d, **kw)
    self.token_type = Embedding(config.type_vocab_size, d, **kw)
    self.norm = LayerNorm(d, eps=config.layer_norm_eps, dtype=config.dtype,
                          param_dtype=config.param_dtype)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (self.word(input_ids).astype(jnp.float32) + self.position(positions)
         + self.token_type(token_type_ids))
    return self.norm(x)


class SelfAttention(nnx.Module):
  """Bidirectional multi-head self-attention with biased ``q``, ``k``, ``v``, ``o`` projections."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    d = config.hidden_size
    self.q, self.k, self.v, self.o = (Dense(d, d, **kw) for _ in range(4))
    self.num_heads, self.head_dim = config.num_heads, config.head_dim

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    batch, seq, _ = x.shape
    shape = (batch, seq, self.num_heads, self.head_dim)
    q, k, v = (proj(x).reshape(shape) for proj in (self.q, self.k, self.v))
    return self.o(bidirectional_attention(q, k, v, mask))


class FeedForward(nnx.Module):
  """``down(gelu(up(x)))`` with the exact (erf) GELU, as BERT."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    kw = dict(dtype=config.dtype, param_dtype=config.param_dtype, rngs=rngs)
    self.up = Dense(config.hidden_size, config.intermediate_size, **kw)
    self.down = Dense(config.intermediate_size, config.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.gelu(self.up(x), approximate=False))


class Layer(nnx.Module):
  """Post-LayerNorm encoder block: ``LN(x + attn(x))``, then ``LN(h + mlp(h))``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    norm = dict(eps=config.layer_norm_eps, dtype=config.dtype, param_dtype=config.param_dtype)
    self.attn = SelfAttention(config, rngs=rngs)
    self.attn_norm = LayerNorm(config.hidden_size, **norm)
    self.mlp = FeedForward(config, rngs=rngs)
    self.mlp_norm = LayerNorm(config.hidden_size, **norm)

  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.attn_norm(x + self.attn(x, mask))
    return self.mlp_norm(x + self.mlp(x))


class Bert(nnx.Module):
  """The BERT encoder (module doc).

  Attributes:
    config: the :class:`BertConfig`.
    embed: :class:`Embeddings`.
    layers: ``nnx.List`` of :class:`Layer`.
    pooler: :class:`Dense` ``(hidden, hidden)`` when ``config.pooler``, else ``None``.
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed = Embeddings(config, rngs=rngs)
    self.layers = nnx.List([Layer(config, rngs=rngs) for _ in range(config.num_layers)])
    self.pooler = (Dense(config.hidden_size, config.hidden_size, dtype=config.dtype,
                         param_dtype=config.param_dtype, rngs=rngs) if config.pooler else None)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """The last hidden states.

    Args:
      input_ids: integer token ids, ``[batch, seq]``.
      attention_mask: ``[batch, seq]``, 1 for real tokens and 0 for padding (default: all 1).
      token_type_ids: ``[batch, seq]`` segment ids (default: all 0).

    Returns:
      ``[batch, seq, hidden]`` in the compute dtype; positions under padding hold values too
      (their queries attend to the real tokens) that callers should ignore.
    """
    seq = input_ids.shape[1]
    if seq > self.config.max_position_embeddings:
      raise ValueError(f"sequence length {seq} exceeds `max_position_embeddings` "
                       f"{self.config.max_position_embeddings}")
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    x = self.embed(input_ids, token_type_ids)
    for layer in self.layers:
      x = layer(x, attention_mask)
    return x

  def pool(self, hidden: jax.Array) -> jax.Array:
    """``BertModel``'s pooler output: ``tanh(dense(hidden[:, 0]))``.

    Raises:
      ValueError: the model has no pooler.
    """
    if self.pooler is None:
      raise ValueError("this model has no pooler (`pooler`=False)")
    return jnp.tanh(self.pooler(hidden[:, 0]))


def pool(hidden: jax.Array, attention_mask: jax.Array, pooling: str) -> jax.Array:
  """One vector per sequence from the hidden states.

  Args:
    hidden: ``[batch, seq, hidden]``.
    attention_mask: ``[batch, seq]``, 1 for real tokens.
    pooling: ``"cls"`` (the first token's state) or ``"mean"`` (the mean over the real tokens).

  Returns:
    ``[batch, hidden]`` in float32.

  Examples:
    >>> h = jnp.arange(12.0).reshape(1, 3, 4)
    >>> pool(h, jnp.array([[1, 1, 0]]), "mean").tolist()
    [[2.0, 3.0, 4.0, 5.0]]
  """
  hidden = hidden.astype(jnp.float32)
  if pooling == "cls":
    return hidden[:, 0]
  if pooling == "mean":
    weights = attention_mask.astype(jnp.float32)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1e-9)
  raise ValueError(f"`pooling` must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class BertClassifier(nnx.Module):
  """A BERT encoder with a linear classification head on a pooled sentence vector.

  Attributes:
    encoder: the :class:`Bert` encoder.
    head: :class:`Dense` ``(hidden, num_classes)``.
    pooling: ``"cls"`` or ``"mean"`` (:func:`pool`).
  """

  def __init__(self, config: BertConfig, num_classes: int, *, pooling: str = "mean",
               rngs: nnx.Rngs):
    if pooling not in POOLINGS:
      raise ValueError(f"`pooling` must be one of {', '.join(POOLINGS)}, got {pooling!r}")
    if num_classes < 2:
      raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
    self.encoder = Bert(config, rngs=rngs)
    self.head = Dense(config.hidden_size, num_classes, dtype=config.dtype,
                      param_dtype=config.param_dtype, rngs=rngs)
    self.pooling = pooling
    self.config = config

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None,
               token_type_ids: jax.Array | None = None) -> jax.Array:
    """float32 logits ``[batch, num_classes]``."""
    if attention_mask is None:
      attention_mask = jnp.ones_like(input_ids)
    hidden = self.encoder(input_ids, attention_mask, token_type_ids)
    return self.head(pool(hidden, attention_mask, self.pooling)).astype(jnp.float32)


def split_params(model: nnx.Module) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """``(graphdef, params)``: the model's graphdef and a plain nested dict of its parameters."""
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def abstract_classifier(config: BertConfig, num_classes: int, pooling: str = "mean"
                        ) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """:func:`split_params` of a :class:`BertClassifier` with ``jax.ShapeDtypeStruct`` leaves."""
  model = nnx.eval_shape(lambda: BertClassifier(config, num_classes, pooling=pooling,
                                                rngs=nnx.Rngs(0)))
  return split_params(model)


def _names(path: tuple[Any, ...]) -> tuple[Any, ...]:
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        key = getattr(key, attr)
        break
    out.append(key)
  return tuple(out)


def is_projected_path(path: tuple[Any, ...]) -> bool:
  """True for the ``kernel`` of an attention (q/k/v/o) or feed-forward (up/down) projection."""
  names = _names(path)
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] in PROJECTED_MODULES


def galore_mask(params: Any) -> Any:
  """A tree like ``params`` with ``True`` on the kernels GaLore projects (and LoRA adapts).

  The attention ``q``/``k``/``v``/``o`` and feed-forward ``up``/``down`` kernels of every
  layer; not the embeddings, LayerNorms, biases, pooler or classification head. Usable as the
  ``mask`` of ``optax.masked`` or of the ``ngalore_jax`` aliases.

  Args:
    params: the nested-dict parameters of :func:`split_params` (arrays, shapes or shardings).

  Returns:
    The same structure with ``bool`` leaves.

  Examples:
    >>> _, params = abstract_classifier(BertConfig(num_layers=1, hidden_size=8, num_heads=2,
    ...                                            intermediate_size=16, vocab_size=10), 2)
    >>> mask = galore_mask(params)
    >>> mask["encoder"]["layers"][0]["attn"]["q"]["kernel"], mask["head"]["kernel"]
    (True, False)
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: is_projected_path(path), params,
      is_leaf=lambda x: isinstance(x, nnx.Variable))


# Hugging Face checkpoints.


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
  """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` dict.

  Args:
    hf: the parsed ``config.json``.
    **overrides: fields to set on the result (e.g. ``dtype="bfloat16"``, ``pooler=False``).

  Raises:
    ValueError: the config is not a BERT config (``model_type`` other than ``"bert"``).
    NotImplementedError: a feature this encoder does not implement (an activation other than
      the exact GELU, relative position embeddings).
  """
  model_type = hf.get("model_type")
  if model_type != "bert":
    raise ValueError(f"model_type {model_type!r} is not a BERT checkpoint; expected 'bert'")
  act = hf.get("hidden_act", "gelu")
  if act != "gelu":
    raise NotImplementedError(f"hidden_act {act!r} is not implemented; only 'gelu' (erf)")
  position = hf.get("position_embedding_type", "absolute")
  if position != "absolute":
    raise NotImplementedError(f"position_embedding_type {position!r} is not implemented; only "
                              "'absolute'")
  config = BertConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hf["hidden_size"],
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=hf["num_attention_heads"],
      max_position_embeddings=hf.get("max_position_embeddings", 512),
      type_vocab_size=hf.get("type_vocab_size", 2),
      layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
  )
  return dataclasses.replace(config, **overrides)


def _name_map(config: BertConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """``{hf_name: (params path, transposed)}`` for every parameter of a :class:`Bert`."""
  names: dict[str, tuple[tuple[Any, ...], bool]] = {
      "embeddings.word_embeddings.weight": (("embed", "word", "embedding"), False),
      "embeddings.position_embeddings.weight": (("embed", "position", "embedding"), False),
      "embeddings.token_type_embeddings.weight": (("embed", "token_type", "embedding"), False),
      "embeddings.LayerNorm.weight": (("embed", "norm", "scale"), False),
      "embeddings.LayerNorm.bias": (("embed", "norm", "bias"), False),
  }

  def dense(hf: str, path: tuple[Any, ...]) -> None:
    names[hf + ".weight"] = (path + ("kernel",), True)
    names[hf + ".bias"] = (path + ("bias",), False)

  def norm(hf: str, path: tuple[Any, ...]) -> None:
    names[hf + ".weight"] = (path + ("scale",), False)
    names[hf + ".bias"] = (path + ("bias",), False)

  for i in range(config.num_layers):
    hf, ours = f"encoder.layer.{i}.", ("layers", i)
    for proj, name in (("q", "query"), ("k", "key"), ("v", "value")):
      dense(hf + f"attention.self.{name}", ours + ("attn", proj))
    dense(hf + "attention.output.dense", ours + ("attn", "o"))
    norm(hf + "attention.output.LayerNorm", ours + ("attn_norm",))
    dense(hf + "intermediate.dense", ours + ("mlp", "up"))
    dense(hf + "output.dense", ours + ("mlp", "down"))
    norm(hf + "output.LayerNorm", ours + ("mlp_norm",))
  if config.pooler:
    dense("pooler.dense", ("pooler",))
  return names


def _canonical(name: str) -> str:
  """TF-converted checkpoints name LayerNorm's parameters gamma and beta."""
  return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$",
                                                                 "LayerNorm.bias", name))


def _set(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: Any, path: tuple[Any, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _read_hf(directory: str) -> tuple[BertConfig, str, dict[str, str]]:
  """``(config, weights file, {canonical name: stored name})`` of a checkpoint directory."""
  config_file = os.path.join(directory, CONFIG_FILE)
  weights_file = os.path.join(directory, WEIGHTS_FILE)
  if not os.path.isfile(config_file):
    raise ValueError(f"{directory}: no {CONFIG_FILE}; not a Hugging Face BERT checkpoint")
  try:
    with open(config_file, encoding="utf-8") as f:
      hf = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{config_file}: not readable JSON ({e})") from None
  if not isinstance(hf, dict):
    raise ValueError(f"{config_file}: not a JSON object")
  config = config_from_hf(hf)
  if not os.path.isfile(weights_file):
    raise ValueError(f"{directory}: no {WEIGHTS_FILE}")
  try:
    with safe_open(weights_file, framework="numpy") as f:
      stored = list(f.keys())
  except Exception as e:  # pylint: disable=broad-except  (safetensors raises its own types)
    raise ValueError(f"{weights_file}: not a readable safetensors file ({e})") from None
  prefixed = any(n.startswith("bert.") for n in stored)
  by_name = {}
  for name in stored:
    if _IGNORED.search(name):
      continue
    if prefixed and not name.startswith("bert."):
      continue  # a task head (cls., classifier., ...)
    by_name[_canonical(name[len("bert."):] if prefixed else name)] = name
  config = dataclasses.replace(config, pooler="pooler.dense.weight" in by_name)
  return config, weights_file, by_name


def hf_bert_config(directory: str | os.PathLike[str], **overrides: Any) -> BertConfig:
  """The :class:`BertConfig` of a Hugging Face BERT checkpoint directory; reads no weights.

  ``pooler`` says whether the checkpoint has ``BertModel``'s pooler.

  Raises:
    ValueError, NotImplementedError: as :func:`load_hf_bert`.
  """
  config, _, _ = _read_hf(os.fspath(directory))
  return dataclasses.replace(config, **overrides)


def load_hf_bert(directory: str | os.PathLike[str], **overrides: Any) -> Bert:
  """Loads a Hugging Face BERT checkpoint directory into a :class:`Bert`.

  Reads ``config.json`` and ``model.safetensors`` (numpy API; torch is never imported).
  Tensor names may carry the ``bert.`` prefix of task models such as
  ``BertForSequenceClassification``, whose task heads are then ignored. The pooler is loaded
  when the checkpoint has one (``config.pooler`` says whether it did).

  Args:
    directory: the checkpoint directory (as written by ``save_pretrained``).
    **overrides: :class:`BertConfig` fields to set, e.g. ``dtype="bfloat16"``.

  Returns:
    The encoder; its config is ``model.config``.

  Raises:
    ValueError: no ``config.json``/``model.safetensors``, a config that is not BERT's, or
      tensors that do not match the config (one line).
    NotImplementedError: a BERT variant this encoder does not implement.

  Examples:
    >>> from train import classify_data
    >>> model = load_hf_bert(classify_data.minilm_path())  # doctest: +SKIP
    >>> model.config.hidden_size  # doctest: +SKIP
    384
  """
  config, weights_file, by_name = _read_hf(os.fspath(directory))
  config = dataclasses.replace(config, **overrides)
  expected = _name_map(config)
  missing = sorted(set(expected) - set(by_name))
  unexpected = sorted(set(by_name) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{weights_file} does not match its config: missing {missing[:6]}"
                     f"{'...' if len(missing) > 6 else ''}, unexpected {unexpected[:6]}"
                     f"{'...' if len(unexpected) > 6 else ''}")
  graphdef, abstract = split_params(nnx.eval_shape(lambda: Bert(config, rngs=nnx.Rngs(0))))
  params: dict[str, Any] = {}
  with safe_open(weights_file, framework="numpy") as f:
    for name, (path, transposed) in expected.items():
      array = f.get_tensor(by_name[name])
      if transposed:
        array = array.T
      want = _get(abstract, path)
      if tuple(array.shape) != tuple(want.shape):
        raise ValueError(f"{name}: shape {tuple(array.shape)} (transposed: {transposed}) does "
                         f"not match {tuple(want.shape)} of the config")
      _set(params, path, jnp.asarray(np.asarray(array), dtype=want.dtype))
  return nnx.merge(graphdef, params)
