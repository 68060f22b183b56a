"""Building blocks of the LLaMA model: RMSNorm, RoPE, linear maps, attention, SwiGLU.

Every module here is a small Flax NNX module with a ``(..., *, rngs)`` constructor
and only :class:`flax.nnx.Param` state. Matrices are stored as 2-D ``(in, out)``
``kernel`` arrays (no biases), so each weight an optimizer may project is a plain
matrix. Parameters live in ``param_dtype``; inputs are cast to the compute
``dtype`` before every matmul, and the numerically delicate parts (RMSNorm
statistics, RoPE angles, attention softmax) run in float32.

Attention has two paths: ``Attention.__call__`` (training and scoring: the whole
sequence at once, no state) and ``Attention.decode`` (generation: new tokens
attend to a :class:`KVCache` of fixed size that is passed in and returned, so
the model itself stays stateless).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec

# Hugging Face's LLaMA initializer: N(0, 0.02) for every matrix and embedding.
DEFAULT_INIT_STD = 0.02


def _explicit_mesh(x: jax.Array) -> jax.sharding.AbstractMesh | None:
  """The mesh of ``x`` if it is sharded in Explicit mode, else None."""
  mesh = getattr(getattr(jax.typeof(x), "sharding", None), "mesh", None)
  if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
    return None
  return mesh


def gather_weight(w: jax.Array) -> jax.Array:
  """All-gathers a weight that is sharded over an Explicit mesh; identity otherwise.

  Under an Explicit mesh, JAX refuses a matmul whose contracting dimension is
  sharded over the same axis as the batch (the FSDP layout), so weights are
  gathered before use (FSDP's gather-on-use) and compute is data parallel.
  Under an Auto mesh, XLA's partitioner chooses the collectives itself, which
  keeps tensor-parallel compute.
  """
  mesh = _explicit_mesh(w)
  if mesh is None or all(axis is None for axis in jax.typeof(w).sharding.spec):
    return w
  return jax.sharding.reshard(w, NamedSharding(mesh, PartitionSpec()))


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
  """Root-mean-square normalisation over the last axis, computed in float32.

  .. math::
    y = \\frac{x}{\\sqrt{\\mathrm{mean}(x^2) + \\epsilon}} \\odot \\mathrm{scale}

  Args:
    x: input of any float dtype, normalised over its last axis.
    scale: per-feature gain, shape ``x.shape[-1:]``.
    eps: added to the mean square before the square root.

  Returns:
    The normalised array, in float32.

  References:
    Zhang & Sennrich, `Root Mean Square Layer Normalization
    <https://arxiv.org/abs/1910.07467>`_, 2019
  """
  x = x.astype(jnp.float32)
  mean_square = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
  return x * jax.lax.rsqrt(mean_square + eps) * scale.astype(jnp.float32)


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
  """The ``head_dim // 2`` rotation frequencies ``theta ** (-2i / head_dim)``, float32."""
  exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  return 1.0 / (theta**exponents)


def apply_rope(x: jax.Array, positions: jax.Array, *, theta: float) -> jax.Array:
  """Rotary position embedding, in the "rotate half" layout of Hugging Face LLaMA.

  Feature ``i`` of the first half of each head is paired with feature ``i`` of the
  second half, and the pair is rotated by the angle ``position * freq_i``. The dot
  product of two rotated vectors then depends only on their position difference.
  Angles are computed in float32; the result has the dtype of ``x``.

  Args:
    x: queries or keys, ``[batch, seq, heads, head_dim]`` with an even ``head_dim``.
    positions: integer positions, ``[batch, seq]``.
    theta: the RoPE base (10000 in LLaMA 1/2, 500000 in LLaMA 3).

  Returns:
    The rotated array, same shape and dtype as ``x``.

  References:
    Su et al., `RoFormer: Enhanced Transformer with Rotary Position Embedding
    <https://arxiv.org/abs/2104.09864>`_, 2021
  """
  head_dim = x.shape[-1]
  inv_freq = rope_inverse_frequencies(head_dim, theta)
  angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [b, s, d/2]
  angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [b, s, 1, d]
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  x32 = x.astype(jnp.float32)
  first, second = jnp.split(x32, 2, axis=-1)
  rotated_half = jnp.concatenate([-second, first], axis=-1)
  return (x32 * cos + rotated_half * sin).astype(x.dtype)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Scaled dot-product attention with a causal mask and grouped key/value heads.

  Query head ``h`` reads key/value head ``h // (heads // kv_heads)``, as in
  Hugging Face's ``repeat_kv``. The mask is by index: token ``t`` sees tokens
  ``0..t`` of the same row. Scores and softmax are float32.

  Args:
    q: queries, ``[batch, seq, heads, head_dim]``.
    k: keys, ``[batch, seq, kv_heads, head_dim]``; ``heads % kv_heads == 0``.
    v: values, same shape as ``k``.

  Returns:
    ``[batch, seq, heads * head_dim]`` in the dtype of ``v``.
  """
  batch, seq, heads, head_dim = q.shape
  kv_heads = k.shape[2]
  q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(head_dim)
  causal = jnp.tril(jnp.ones((seq, seq), dtype=bool))
  scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(batch, seq, heads * head_dim)


class KVCache(NamedTuple):
  """Keys and values of one attention layer, for incremental decoding.

  Slot ``s`` of the cache holds the key and value of the token written at
  slot ``s`` (keys with RoPE already applied at that token's position). The
  cache has a fixed size; which slots are valid is the caller's bookkeeping
  (see :func:`cached_attention`).

  Attributes:
    k: keys, ``[batch, max_len, kv_heads, head_dim]``.
    v: values, same shape as ``k``.
  """

  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, batch: int, max_len: int, kv_heads: int, head_dim: int,
            dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache of ``max_len`` slots."""
    shape = (batch, max_len, kv_heads, head_dim)
    return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


def cached_attention(q: jax.Array, cache: KVCache, start: jax.Array | int) -> jax.Array:
  """Attention of new queries over a key/value cache, causal by slot.

  The ``seq`` queries belong to slots ``start .. start + seq - 1``; query ``t``
  sees cache slots ``0 .. start + t`` (the slots after it hold stale or padding
  values and are masked out). Grouped heads, scaling and float32 softmax are
  as in :func:`causal_attention`, whose result this equals (up to float
  rounding) when the cache holds the same keys and values.

  Args:
    q: queries, ``[batch, seq, heads, head_dim]``, RoPE applied.
    cache: the cache, already holding the new tokens' keys and values.
    start: slot of the first query (an int or a traced integer scalar).

  Returns:
    ``[batch, seq, heads * head_dim]`` in the dtype of the cached values.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> q, k, v = jax.random.normal(jax.random.key(0), (3, 1, 5, 4, 8))
    >>> k, v = k[:, :, :2], v[:, :, :2]  # 2 key/value heads for 4 query heads
    >>> cache = KVCache(jnp.pad(k, ((0, 0), (0, 3), (0, 0), (0, 0))),
    ...                 jnp.pad(v, ((0, 0), (0, 3), (0, 0), (0, 0))))
    >>> bool(jnp.allclose(cached_attention(q[:, 2:], cache, 2),
    ...                   causal_attention(q, k, v)[:, 2:], atol=1e-6))
    True
  """
  batch, seq, heads, head_dim = q.shape
  _, max_len, kv_heads, _ = cache.k.shape
  q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim)
  scores = jnp.einsum("btkgd,bskd->bkgts", q, cache.k, preferred_element_type=jnp.float32)
  scores = scores / math.sqrt(head_dim)
  query_slots = start + jnp.arange(seq)
  visible = jnp.arange(max_len)[None, :] <= query_slots[:, None]  # [seq, max_len]
  scores = jnp.where(visible, scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(cache.v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, cache.v)
  return out.reshape(batch, seq, heads * head_dim)


class Linear(nnx.Module):
  """A bias-free dense layer with a 2-D ``(in, out)`` kernel.

  Attributes:
    kernel: ``nnx.Param`` of shape ``(in_features, out_features)``.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      dtype: jnp.dtype,
      param_dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(DEFAULT_INIT_STD)
    self.kernel = nnx.Param(init(rngs.params(), (in_features, out_features), param_dtype))
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.dot(x.astype(self.dtype), gather_weight(self.kernel[...]).astype(self.dtype))


class Embed(nnx.Module):
  """Token embedding table, also usable as a tied output projection.

  Attributes:
    embedding: ``nnx.Param`` of shape ``(vocab_size, features)``.
  """

  def __init__(
      self,
      vocab_size: int,
      features: int,
      *,
      dtype: jnp.dtype,
      param_dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    init = nnx.initializers.normal(DEFAULT_INIT_STD)
    self.embedding = nnx.Param(init(rngs.params(), (vocab_size, features), param_dtype))
    self.dtype = dtype

  def __call__(self, tokens: jax.Array) -> jax.Array:
    table = gather_weight(self.embedding[...])
    mesh = _explicit_mesh(tokens)
    if mesh is None:
      return jnp.take(table, tokens, axis=0).astype(self.dtype)
    spec = tuple(jax.typeof(tokens).sharding.spec)
    spec += (None,) * (tokens.ndim + 1 - len(spec))  # the new feature axis is not sharded
    out_sharding = NamedSharding(mesh, PartitionSpec(*spec))
    return table.at[tokens].get(out_sharding=out_sharding).astype(self.dtype)

  def attend(self, x: jax.Array) -> jax.Array:
    """Logits ``x @ embedding.T`` (tied lm_head), accumulated in float32."""
    table = gather_weight(self.embedding[...]).astype(self.dtype)
    return jnp.einsum("...d,vd->...v", x.astype(self.dtype), table,
                      preferred_element_type=jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm with a learned per-feature ``scale`` (initialised to ones); see :func:`rms_norm`.

  The output is cast to the compute ``dtype``.
  """

  def __init__(self, features: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
    self.scale = nnx.Param(jnp.ones((features,), param_dtype))
    self.eps = eps
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.scale[...], self.eps).astype(self.dtype)


class Attention(nnx.Module):
  """Causal multi-head self-attention with RoPE and grouped-query key/values.

  Attributes:
    q: ``Linear(hidden, heads * head_dim)``.
    k: ``Linear(hidden, kv_heads * head_dim)``.
    v: ``Linear(hidden, kv_heads * head_dim)``.
    o: ``Linear(heads * head_dim, hidden)``.
  """

  def __init__(
      self,
      hidden_size: int,
      num_heads: int,
      num_kv_heads: int,
      head_dim: int,
      *,
      rope_theta: float,
      dtype: jnp.dtype,
      param_dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    if num_heads % num_kv_heads:
      raise ValueError(f"num_heads={num_heads} is not a multiple of num_kv_heads={num_kv_heads}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q = Linear(hidden_size, num_heads * head_dim, **kw)
    self.k = Linear(hidden_size, num_kv_heads * head_dim, **kw)
    self.v = Linear(hidden_size, num_kv_heads * head_dim, **kw)
    self.o = Linear(num_heads * head_dim, hidden_size, **kw)
    self.num_heads = num_heads
    self.num_kv_heads = num_kv_heads
    self.head_dim = head_dim
    self.rope_theta = rope_theta

  def _qkv(self, x: jax.Array, positions: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Queries and keys (RoPE applied) and values, split into heads."""
    batch, seq, _ = x.shape
    q = self.q(x).reshape(batch, seq, self.num_heads, self.head_dim)
    k = self.k(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    v = self.v(x).reshape(batch, seq, self.num_kv_heads, self.head_dim)
    q = apply_rope(q, positions, theta=self.rope_theta)
    k = apply_rope(k, positions, theta=self.rope_theta)
    return q, k, v

  def __call__(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """Causal self-attention over the whole sequence ``x`` (``[batch, seq, hidden]``)."""
    return self.o(causal_attention(*self._qkv(x, positions)))

  def decode(
      self,
      x: jax.Array,
      positions: jax.Array,
      cache: KVCache,
      start: jax.Array | int,
  ) -> tuple[jax.Array, KVCache]:
    """Attention for new tokens over a cache of the earlier ones.

    Writes the new keys and values into cache slots ``start .. start + seq - 1``
    and attends to slots ``0 .. start + t`` from new token ``t``
    (:func:`cached_attention`). RoPE uses ``positions``, not the slots, so a
    caller that pads or packs can place tokens where it likes.

    Args:
      x: the new tokens' hidden states, ``[batch, seq, hidden]``.
      positions: their RoPE positions, ``[batch, seq]``.
      cache: this layer's cache; ``start + seq`` must not exceed its size
        (``jax.lax.dynamic_update_slice`` would silently move the write).
      start: slot of the first new token (an int or a traced integer scalar).

    Returns:
      ``(output [batch, seq, hidden], updated cache)``.
    """
    q, k, v = self._qkv(x, positions)
    index = (0, start, 0, 0)
    cache = KVCache(jax.lax.dynamic_update_slice(cache.k, k.astype(cache.k.dtype), index),
                    jax.lax.dynamic_update_slice(cache.v, v.astype(cache.v.dtype), index))
    return self.o(cached_attention(q, cache, start)), cache


class MLP(nnx.Module):
  """SwiGLU feed-forward block: ``down(silu(gate(x)) * up(x))``.

  References:
    Shazeer, `GLU Variants Improve Transformer <https://arxiv.org/abs/2002.05202>`_, 2020
  """

  def __init__(
      self,
      hidden_size: int,
      intermediate_size: int,
      *,
      dtype: jnp.dtype,
      param_dtype: jnp.dtype,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate = Linear(hidden_size, intermediate_size, **kw)
    self.up = Linear(hidden_size, intermediate_size, **kw)
    self.down = Linear(intermediate_size, hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
