"""A LLaMA decoder in Flax NNX, with the GaLore paper's model presets.

The model is a stack of pre-norm blocks, ``x + attn(norm(x))`` then
``x + mlp(norm(x))``, between a token embedding and a final norm plus an
(untied by default) output projection. See :mod:`models.layers` for the pieces.

Parameters, as returned by :func:`split_params` (a plain nested dict; block
indices are ``int`` keys)::

  params["embed"]["embedding"]                    (vocab, hidden)
  params["blocks"][i]["attn_norm"]["scale"]       (hidden,)
  params["blocks"][i]["attn"]["q"]["kernel"]      (hidden, heads * head_dim)
  params["blocks"][i]["attn"]["k"]["kernel"]      (hidden, kv_heads * head_dim)
  params["blocks"][i]["attn"]["v"]["kernel"]      (hidden, kv_heads * head_dim)
  params["blocks"][i]["attn"]["o"]["kernel"]      (heads * head_dim, hidden)
  params["blocks"][i]["mlp_norm"]["scale"]        (hidden,)
  params["blocks"][i]["mlp"]["gate"]["kernel"]    (hidden, ffn)
  params["blocks"][i]["mlp"]["up"]["kernel"]      (hidden, ffn)
  params["blocks"][i]["mlp"]["down"]["kernel"]    (ffn, hidden)
  params["final_norm"]["scale"]                   (hidden,)
  params["lm_head"]["kernel"]                     (hidden, vocab); absent when tied

Examples:
  >>> import jax.numpy as jnp
  >>> from flax import nnx
  >>> from models import llama
  >>> cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                         num_layers=2, num_heads=4, num_kv_heads=2)
  >>> model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  >>> model(jnp.zeros((2, 5), jnp.int32)).shape
  (2, 5, 64)
  >>> graphdef, params = llama.split_params(model)
  >>> llama.apply(graphdef, params, jnp.zeros((2, 5), jnp.int32)).dtype
  dtype('float32')

Incremental decoding (what :func:`models.generate` does inside one jit): a
prompt, then one token at a time, against a fixed-size key/value cache:

  >>> tokens = jnp.arange(6)[None]
  >>> cache = model.init_cache(batch=1, max_len=8)
  >>> _, cache = model.decode(tokens[:, :5], cache, start=0)
  >>> last, cache = model.decode(tokens[:, 5:], cache, start=5)
  >>> bool(jnp.allclose(last[:, 0], model(tokens)[:, 5], atol=1e-5))
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec

from models import layers
from models.layers import KVCache
from models.partitioning import batch_spec
from models.partitioning import galore_labels
from models.partitioning import galore_mask
from models.partitioning import logical_axes
from models.partitioning import logical_axis_rules
from models.partitioning import partition_specs

__all__ = [
    "CONFIGS",
    "Block",
    "KVCache",
    "Llama",
    "LlamaConfig",
    "abstract_params",
    "apply",
    "batch_spec",
    "galore_labels",
    "galore_mask",
    "init_params",
    "logical_axes",
    "logical_axis_rules",
    "partition_specs",
    "split_params",
]


@dataclasses.dataclass(frozen=True, slots=True)
class LlamaConfig:
  """Shapes and numerics of a LLaMA model.

  Frozen and hashable (it is static data of the graphdef); derive variants with
  ``dataclasses.replace``. ``dtype`` and ``param_dtype`` accept anything
  ``jnp.dtype`` does and are stored as their names (``"float32"``, ``"bfloat16"``),
  so ``dataclasses.asdict(cfg)`` is JSON-ready.

  Attributes:
    vocab_size: number of token ids.
    hidden_size: model width ``d``.
    intermediate_size: SwiGLU width ``ffn``.
    num_layers: number of blocks.
    num_heads: query heads.
    num_kv_heads: key/value heads (grouped-query attention); ``None`` means
      ``num_heads``. ``dataclasses.replace`` keeps it, so set it again when
      changing ``num_heads``.
    max_position_embeddings: longest sequence the model accepts.
    rope_theta: RoPE base.
    rms_norm_eps: RMSNorm epsilon.
    tie_word_embeddings: if True, logits use the embedding table and there is
      no ``lm_head`` parameter.
    dtype: compute dtype of activations and matmuls; logits are always float32.
    param_dtype: storage dtype of the parameters.
    remat: if True, each block is rematerialised in the backward pass
      (``nnx.remat``), trading compute for activation memory.
    remat_policy: optional name of a ``jax.checkpoint_policies`` member (e.g.
      ``"dots_with_no_batch_dims_saveable"``) used when ``remat`` is True.
  """

  vocab_size: int = 32000
  hidden_size: int = 256
  intermediate_size: int = 688
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int | None = None
  max_position_embeddings: int = 512
  rope_theta: float = 10000.0
  rms_norm_eps: float = 1e-6
  tie_word_embeddings: bool = False
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  remat: bool = False
  remat_policy: str | None = None

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    for name in ("dtype", "param_dtype"):
      dtype = jnp.dtype(getattr(self, name))
      if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must be a float dtype, got {dtype}")
      object.__setattr__(self, name, dtype.name)
    for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                 "num_kv_heads", "max_position_embeddings"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size={self.hidden_size} is not a multiple of "
                       f"num_heads={self.num_heads}")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}")
    if self.head_dim % 2:
      raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
    if self.remat_policy is not None and not hasattr(jax.checkpoint_policies,
                                                     self.remat_policy):
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}")

  @property
  def head_dim(self) -> int:
    """Width of one attention head, ``hidden_size // num_heads``."""
    return self.hidden_size // self.num_heads

  def num_params(self) -> int:
    """Number of parameters, counted analytically.

    Per block: ``d * (2 * heads + 2 * kv_heads) * head_dim`` for attention,
    ``3 * d * ffn`` for the MLP and ``2 * d`` for the two norm scales; plus
    ``vocab * d`` for the embedding, ``d`` for the final norm and ``d * vocab``
    for the lm_head unless tied.
    """
    d, hd = self.hidden_size, self.head_dim
    attn = d * (2 * self.num_heads + 2 * self.num_kv_heads) * hd
    block = attn + 3 * d * self.intermediate_size + 2 * d
    head = 0 if self.tie_word_embeddings else d * self.vocab_size
    return self.vocab_size * d + self.num_layers * block + d + head

  def num_matmul_params(self) -> int:
    """Parameters used in matmuls: all blocks' kernels plus the output projection.

    The embedding lookup is a gather and the norms are elementwise, so neither
    counts; the output projection counts once whether or not it is tied.
    """
    d, hd = self.hidden_size, self.head_dim
    attn = d * (2 * self.num_heads + 2 * self.num_kv_heads) * hd
    return self.num_layers * (attn + 3 * d * self.intermediate_size) + d * self.vocab_size

  def flops_per_token(self, seq_len: int) -> float:
    """Training FLOPs per token (forward + backward) at sequence length ``seq_len``.

    .. math::
      6 N_{\\mathrm{matmul}} + 12 \\, L \\, H \\, d_{\\mathrm{head}} \\, T

    The first term is 2 FLOPs per multiply-add per matmul weight, times 3 for
    forward plus backward (:meth:`num_matmul_params`). The second counts the
    score (``q k^T``) and value (``p v``) products, ``2 * 2 * H * d_head * T``
    per token and layer forward, times 3. As in PaLM's MFU, the full ``T x T``
    square is counted (the dense computation here does all of it); halve the
    second term for a causal-only count. Elementwise work (norms, RoPE,
    softmax, SwiGLU) is ignored.

    Args:
      seq_len: training sequence length ``T``.

    Returns:
      FLOPs per trained token.

    References:
      Chowdhery et al., `PaLM <https://arxiv.org/abs/2204.02311>`_, 2022, appendix B
    """
    attention = 12 * self.num_layers * self.num_heads * self.head_dim * seq_len
    return float(6 * self.num_matmul_params() + attention)


_PAPER = dict(vocab_size=32000, tie_word_embeddings=False, rms_norm_eps=1e-6,
              max_position_embeddings=1024)

#: Presets: the GaLore paper's LLaMA shapes, ``tiny`` for CPU tests and demos, and the shapes of
#: pretrained models this project can load (``smollm2-135m``: SmolLM2-135M-Instruct, read from its
#: GGUF file by :func:`models.load_gguf_llama`; tied embeddings, 3 key/value heads for 9 queries).
CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig(**{**_PAPER, "max_position_embeddings": 512}, hidden_size=256,
                        intermediate_size=688, num_heads=4, num_layers=4),
    "60m": LlamaConfig(**_PAPER, hidden_size=512, intermediate_size=1376, num_heads=8,
                       num_layers=8),
    "130m": LlamaConfig(**_PAPER, hidden_size=768, intermediate_size=2048, num_heads=12,
                        num_layers=12),
    "350m": LlamaConfig(**_PAPER, hidden_size=1024, intermediate_size=2736, num_heads=16,
                        num_layers=24),
    "1b": LlamaConfig(**_PAPER, hidden_size=2048, intermediate_size=5461, num_heads=32,
                      num_layers=24),
    "7b": LlamaConfig(**{**_PAPER, "max_position_embeddings": 2048}, hidden_size=4096,
                      intermediate_size=11008, num_heads=32, num_layers=32),
    "smollm2-135m": LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                num_layers=30, num_heads=9, num_kv_heads=3,
                                max_position_embeddings=8192, rope_theta=100000.0,
                                rms_norm_eps=1e-5, tie_word_embeddings=True),
}


class Block(nnx.Module):
  """Pre-norm decoder block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    norm = dict(eps=config.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
    self.attn_norm = layers.RMSNorm(config.hidden_size, **norm)
    self.attn = layers.Attention(
        config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
        rope_theta=config.rope_theta, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.mlp_norm = layers.RMSNorm(config.hidden_size, **norm)
    self.mlp = layers.MLP(config.hidden_size, config.intermediate_size, dtype=dtype,
                          param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    x = x + self.attn(self.attn_norm(x), positions)
    return x + self.mlp(self.mlp_norm(x))

  def decode(self, x: jax.Array, positions: jax.Array, cache: KVCache,
             start: jax.Array | int) -> tuple[jax.Array, KVCache]:
    """The block on new tokens, attending through a cache (:meth:`layers.Attention.decode`)."""
    attn, cache = self.attn.decode(self.attn_norm(x), positions, cache, start)
    x = x + attn
    return x + self.mlp(self.mlp_norm(x)), cache


def _call_block(block: Block, x: jax.Array, positions: jax.Array) -> jax.Array:
  return block(x, positions)


def _batch_layout(batch: int) -> tuple[Any, str | None, int] | None:
  """How activations are split under an Auto context mesh (``jax.set_mesh``).

  Args:
    batch: the batch size.

  Returns:
    ``(batch_axes, data_axis, fsdp_size)``: the mesh axes of the batch dim
    (:func:`batch_spec`'s FSDP split over the ``data`` and ``fsdp`` axes the mesh
    has), the ``data`` axis (None if absent) and the ``fsdp`` axis size (1 if
    absent). None without a context mesh, under an Explicit one (shardings travel
    in the types there, see :class:`models.layers.Embed`), without either axis,
    or when the batch does not split evenly: activations are then left to XLA.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or any(t != AxisType.Auto for t in mesh.axis_types):
    return None
  axes = batch_spec("fsdp", mesh=mesh)[0]
  names = (axes,) if isinstance(axes, str) else tuple(axes or ())
  if not names or batch % math.prod(mesh.shape[a] for a in names):
    return None
  return axes, ("data" if "data" in mesh.shape else None), mesh.shape.get("fsdp", 1)


def _constrain(x: jax.Array, *spec: Any) -> jax.Array:
  return jax.lax.with_sharding_constraint(x, PartitionSpec(*spec))


def _embed_split(embed: layers.Embed, tokens: jax.Array, batch_axes: Any,
                 data_axis: str | None, fsdp_size: int) -> jax.Array:
  """``embed(tokens)`` split over ``batch_axes`` along the batch, by an explicit route.

  Under FSDP the table is split over ``fsdp`` along its width. The lookup takes
  the token ids gathered over ``fsdp`` (small integers) and returns width-split
  rows; one all-to-all makes them batch-split. The backward pass is the reverse
  all-to-all and a scatter-add into the table's own shard. Left to itself, XLA
  moves that cotangent from the batch to the width layout by replicating it
  ("Involuntary full rematerialization"), an all-gather of a whole activation.
  """
  if fsdp_size > 1 and embed.embedding.shape[1] % fsdp_size == 0:
    x = _constrain(embed(_constrain(tokens, data_axis, None)), data_axis, None, "fsdp")
  else:
    x = embed(tokens)
  return _constrain(x, batch_axes, None, None)


class Llama(nnx.Module):
  """The LLaMA decoder-only language model.

  Attributes:
    config: the :class:`LlamaConfig`.
    embed: token embedding, :class:`models.layers.Embed`.
    blocks: ``nnx.List`` of :class:`Block`.
    final_norm: :class:`models.layers.RMSNorm` before the output projection.
    lm_head: :class:`models.layers.Linear` ``(hidden, vocab)``, or ``None`` when
      ``config.tie_word_embeddings``.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    dtype, param_dtype = jnp.dtype(config.dtype), jnp.dtype(config.param_dtype)
    self.config = config
    self.embed = layers.Embed(config.vocab_size, config.hidden_size, dtype=dtype,
                              param_dtype=param_dtype, rngs=rngs)
    self.blocks = nnx.List([Block(config, rngs=rngs) for _ in range(config.num_layers)])
    self.final_norm = layers.RMSNorm(config.hidden_size, eps=config.rms_norm_eps, dtype=dtype,
                                     param_dtype=param_dtype)
    if config.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.Linear(config.hidden_size, config.vocab_size, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs)

  def __call__(self, tokens: jax.Array, positions: jax.Array | None = None) -> jax.Array:
    """Next-token logits.

    Under an Auto context mesh (``jax.set_mesh``, as ``train.build`` does) the
    embedding output and the residual stream between blocks are pinned to the
    batch's split over the ``data`` and ``fsdp`` axes, so the backward pass keeps
    one activation layout; without a mesh nothing changes.

    Args:
      tokens: integer token ids, ``[batch, seq]``.
      positions: optional integer positions for RoPE, ``[batch, seq]``; defaults
        to ``0 .. seq-1`` in every row. Attention is causal by index whatever
        the positions.

    Returns:
      float32 logits, ``[batch, seq, vocab]``.
    """
    config = self.config
    batch, seq = tokens.shape
    if seq > config.max_position_embeddings:
      raise ValueError(f"sequence length {seq} exceeds max_position_embeddings="
                       f"{config.max_position_embeddings}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    call_block = _call_block
    if config.remat:
      policy = None
      if config.remat_policy is not None:
        policy = getattr(jax.checkpoint_policies, config.remat_policy)
      call_block = nnx.remat(_call_block, policy=policy)
    layout = _batch_layout(batch)
    x = self.embed(tokens) if layout is None else _embed_split(self.embed, tokens, *layout)
    for block in self.blocks:
      x = call_block(block, x, positions)
      if layout is not None:  # the residual stream keeps the batch's split between blocks
        x = _constrain(x, layout[0], None, None)
    return self._logits(self.final_norm(x))

  def _logits(self, x: jax.Array) -> jax.Array:
    """float32 logits of normalised hidden states (tied or untied output projection)."""
    if self.lm_head is None:
      return self.embed.attend(x)
    return self.lm_head(x).astype(jnp.float32)

  def init_cache(self, batch: int, max_len: int, dtype: Any = None) -> tuple[KVCache, ...]:
    """An empty key/value cache for :meth:`decode`: one :class:`KVCache` per block.

    Args:
      batch: batch size.
      max_len: number of slots (prompt plus generated tokens, padding included).
      dtype: storage dtype; defaults to the compute ``config.dtype``.

    Returns:
      A tuple of ``num_layers`` caches of shape ``[batch, max_len, kv_heads, head_dim]``.
    """
    config = self.config
    dtype = jnp.dtype(config.dtype if dtype is None else dtype)
    return tuple(KVCache.zeros(batch, max_len, config.num_kv_heads, config.head_dim, dtype)
                 for _ in range(config.num_layers))

  def decode(
      self,
      tokens: jax.Array,
      cache: tuple[KVCache, ...],
      start: jax.Array | int,
      *,
      positions: jax.Array | None = None,
      logits_at: jax.Array | int | None = None,
  ) -> tuple[jax.Array, tuple[KVCache, ...]]:
    """Next-token logits of new tokens that attend to earlier ones through a cache.

    The new tokens go to cache slots ``start .. start + seq - 1``; token ``t``
    attends to slots ``0 .. start + t``. Prefill is ``decode(prompt, cache, 0)``,
    then each step ``decode(token[:, None], cache, start)`` with ``start`` one
    further. Results equal :meth:`__call__` on the whole sequence up to float
    rounding. Slots after the last written one may hold anything (padding,
    stale keys): they are never attended to.

    Args:
      tokens: the new token ids, ``[batch, seq]``.
      cache: from :meth:`init_cache` or a previous :meth:`decode`;
        ``start + seq`` must not exceed its size.
      start: cache slot of the first new token (an int or a traced integer).
      positions: RoPE positions of the new tokens, ``[batch, seq]``; defaults
        to their slots, ``start .. start + seq - 1``.
      logits_at: if given, an index into the new tokens: only that token's
        logits are computed (e.g. the last real token of a padded prompt).

    Returns:
      ``(logits, cache)``: float32 logits ``[batch, seq, vocab]`` (or
      ``[batch, vocab]`` with ``logits_at``) and the updated cache.
    """
    batch, seq = tokens.shape
    if len(cache) != len(self.blocks):
      raise ValueError(f"cache has {len(cache)} layers, the model {len(self.blocks)}")
    if positions is None:
      positions = jnp.broadcast_to(start + jnp.arange(seq, dtype=jnp.int32), (batch, seq))
    x = self.embed(tokens)
    new_cache = []
    for block, layer_cache in zip(self.blocks, cache):
      x, layer_cache = block.decode(x, positions, layer_cache, start)
      new_cache.append(layer_cache)
    if logits_at is not None:
      x = jax.lax.dynamic_index_in_dim(x, logits_at, axis=1, keepdims=False)
    return self._logits(self.final_norm(x)), tuple(new_cache)


def split_params(model: Llama) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """The pure functional view of a model: its graphdef and a nested dict of its params.

  Args:
    model: a :class:`Llama` (or any NNX module whose state is all ``nnx.Param``).

  Returns:
    ``(graphdef, params)``, where ``params`` is a plain nested dict of arrays
    (``nnx.to_pure_dict``) with the keys listed in the module doc.
  """
  graphdef, state = nnx.split(model, nnx.Param)
  return graphdef, nnx.to_pure_dict(state)


def apply(
    graphdef: nnx.GraphDef,
    params: dict[str, Any],
    tokens: jax.Array,
    positions: jax.Array | None = None,
) -> jax.Array:
  """Pure forward pass: rebuilds the model from ``(graphdef, params)`` and calls it.

  Safe under ``jax.jit``/``jax.grad`` (``graphdef`` is static data).

  Args:
    graphdef: from :func:`split_params`, :func:`init_params` or :func:`abstract_params`.
    params: nested dict of arrays, same structure as :func:`split_params` returns.
    tokens: integer token ids, ``[batch, seq]``.
    positions: optional RoPE positions, ``[batch, seq]``.

  Returns:
    float32 logits, ``[batch, seq, vocab]``.
  """
  return nnx.merge(graphdef, params)(tokens, positions)


def init_params(config: LlamaConfig, seed: int = 0) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """Builds a randomly initialised model and returns :func:`split_params` of it."""
  return split_params(Llama(config, rngs=nnx.Rngs(seed)))


def abstract_params(config: LlamaConfig) -> tuple[nnx.GraphDef, dict[str, Any]]:
  """Like :func:`init_params` with ``jax.ShapeDtypeStruct`` leaves; allocates nothing.

  Examples:
    >>> import math
    >>> from models import llama
    >>> cfg = llama.CONFIGS["7b"]
    >>> _, params = llama.abstract_params(cfg)
    >>> sum(math.prod(p.shape) for p in jax.tree.leaves(params)) == cfg.num_params()
    True
  """
  model = nnx.eval_shape(lambda: Llama(config, rngs=nnx.Rngs(0)))
  return split_params(model)
