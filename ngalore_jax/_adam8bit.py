"""8-bit Adam: both moments stored blockwise-quantised on a dynamic (tree) map."""

import math
from typing import Any, NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from ngalore_jax import _checks
from ngalore_jax import _sharding
from ngalore_jax import _tree

DEFAULT_BLOCK_SIZE = 256
DEFAULT_MIN_8BIT_SIZE = 4096


def _linspace_float32(start: float, stop: float, num: int) -> np.ndarray:
  """``num`` evenly spaced float32 values, rounded as ``torch.linspace`` rounds them on CPU.

  The step is a float32; the first half counts up from ``start`` and the second half down from
  ``stop``, each value ``start + i * step`` rounded once to float32 (a fused multiply-add,
  exact here in float64). NumPy's float64 linspace cast to float32 differs in the last bit on
  a few entries, and so do the maps built from it.
  """
  start32, stop32 = np.float32(start), np.float32(stop)
  step = np.float64((stop32 - start32) / np.float32(num - 1))
  index = np.arange(num, dtype=np.float64)
  up = np.float64(start32) + step * index
  down = np.float64(stop32) - step * (num - 1 - index)
  return np.where(index < num // 2, up, down).astype(np.float32)


def dynamic_map(signed: bool = True, max_exponent_bits: int = 7,
                total_bits: int = 8) -> np.ndarray:
  """The 256 sorted values of the dynamic (tree) quantisation map of 8-bit optimizers.

  Dettmers et al.'s dynamic data type (bitsandbytes' ``create_dynamic_map``): for each decade
  ``10**-6 ... 10**0`` a run of linearly spaced fractions, more of them in the larger decades,
  plus ``0`` and ``1``. The signed map (first moments) mirrors the fractions about zero and
  spans ``[-0.993, 1]``; the unsigned one (second moments) spends the sign bit on twice as many
  fractions per decade in ``[0, 1]``.

  Args:
    signed: The map for signed values (``True``) or non-negative ones.
    max_exponent_bits: Number of decades (exponent values) the map covers.
    total_bits: Bits per code: the map has ``2 ** total_bits`` entries.

  Returns:
    A sorted float32 NumPy array of ``2 ** total_bits`` values in ``[-1, 1]``.

  Examples:
    >>> from ngalore_jax import _adam8bit
    >>> signed = _adam8bit.dynamic_map(signed=True)
    >>> signed.shape, float(signed.min()) > -1.0, float(signed.max())
    ((256,), True, 1.0)
    >>> float(_adam8bit.dynamic_map(signed=False).min())
    0.0
  """
  values = []
  non_sign_bits = total_bits - 1
  additional_items = 2 ** (non_sign_bits - max_exponent_bits) - 1
  for i in range(max_exponent_bits):
    items = (2 ** (i + non_sign_bits - max_exponent_bits) + 1 if signed
             else 2 ** (i + non_sign_bits - max_exponent_bits + 1) + 1)
    boundaries = _linspace_float32(0.1, 1.0, items)
    means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
    decade = np.float32(10.0 ** (-(max_exponent_bits - 1) + i))
    values.append(decade * means)
    if signed:
      values.append(-decade * means)
  if additional_items > 0:
    boundaries = _linspace_float32(0.1, 1.0, additional_items + 1)
    means = (boundaries[:-1] + boundaries[1:]) / np.float32(2.0)
    decade = np.float32(10.0 ** (-(max_exponent_bits - 1) + max_exponent_bits - 1))
    values.append(decade * means)
    if signed:
      values.append(-decade * means)
  values.append(np.array([0.0, 1.0], np.float32))
  data = np.concatenate(values).astype(np.float32)
  if data.size != 2 ** total_bits:
    raise ValueError(f"dynamic_map: {data.size} values for {total_bits} bits.")
  return np.sort(data)


# The maps and the midpoints between neighbouring codes (nearest-code quantisation is a
# searchsorted on the midpoints; a value exactly on one goes to the lower code).
_SIGNED_MAP = dynamic_map(signed=True)
_UNSIGNED_MAP = dynamic_map(signed=False)
_SIGNED_BOUNDS = (_SIGNED_MAP[:-1] + _SIGNED_MAP[1:]) / np.float32(2.0)
_UNSIGNED_BOUNDS = (_UNSIGNED_MAP[:-1] + _UNSIGNED_MAP[1:]) / np.float32(2.0)


def _maps(signed: bool) -> tuple[jax.Array, jax.Array]:
  if signed:
    return jnp.asarray(_SIGNED_MAP), jnp.asarray(_SIGNED_BOUNDS)
  return jnp.asarray(_UNSIGNED_MAP), jnp.asarray(_UNSIGNED_BOUNDS)


def num_blocks(size: int, block_size: int) -> int:
  """Blocks of ``block_size`` covering ``size`` values (the last one may be partial)."""
  return -(-size // block_size)


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
  """``x`` flattened (row-major), zero-padded to whole blocks, as ``[blocks, block_size]``.

  Under an ``Explicit`` mesh ``x`` is gathered first (blocks run across the flattened leaf, and
  such meshes refuse to reshape a split axis): the 8-bit state is replicated.
  """
  sharding = _sharding.explicit_sharding(x)
  if sharding is not None:
    x = jax.sharding.reshard(x, NamedSharding(sharding.mesh, PartitionSpec()))
  flat = x.reshape(-1)
  blocks = num_blocks(flat.size, block_size)
  return jnp.pad(flat, (0, blocks * block_size - flat.size)).reshape(blocks, block_size)


def from_blocks(blocks: jax.Array, shape: tuple[int, ...], like: Any = None) -> jax.Array:
  """Inverse of :func:`to_blocks`: drops the padding and restores ``shape`` (and, under an
  ``Explicit`` mesh, the sharding of ``like``)."""
  out = blocks.reshape(-1)[:math.prod(shape)].reshape(shape)
  sharding = None if like is None else _sharding.explicit_sharding(like)
  if sharding is not None:
    out = jax.sharding.reshard(out, sharding)
  return out


def quantize_blockwise(blocks: jax.Array, *, signed: bool = True) -> tuple[jax.Array, jax.Array]:
  """Quantises ``[blocks, block_size]`` float values to uint8 codes of the dynamic map.

  Each block is divided by its absolute maximum (its scale), and each value replaced by the
  index of the nearest map value (bitsandbytes' ``quantize_blockwise``). An all-zero block gets
  scale ``0`` and the code of ``0``.

  Args:
    blocks: A float array ``[blocks, block_size]`` (see :func:`to_blocks`).
    signed: Use the signed map (first moments) or the unsigned one (non-negative values).

  Returns:
    ``(codes, absmax)``: uint8 ``[blocks, block_size]`` and float32 ``[blocks]``.

  Examples:
    >>> import jax.numpy as jnp
    >>> from ngalore_jax import _adam8bit
    >>> codes, absmax = _adam8bit.quantize_blockwise(jnp.array([[0.5, -1.0, 0.0, 2.0]]))
    >>> codes.dtype, absmax.tolist()
    (dtype('uint8'), [2.0])
    >>> [round(v, 2) for v in _adam8bit.dequantize_blockwise(codes, absmax)[0].tolist()]
    [0.5, -1.0, 0.0, 2.0]
  """
  _, bounds = _maps(signed)
  blocks = blocks.astype(jnp.float32)
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  normed = jnp.clip(blocks / jnp.where(absmax > 0, absmax, 1.0)[..., None], -1.0, 1.0)
  codes = jnp.searchsorted(bounds, normed, side="left")
  return codes.astype(jnp.uint8), absmax


def dequantize_blockwise(codes: jax.Array, absmax: jax.Array, *,
                         signed: bool = True) -> jax.Array:
  """Float32 values of uint8 ``codes`` ``[blocks, block_size]`` with per-block ``absmax``."""
  code, _ = _maps(signed)
  return code[codes.astype(jnp.int32)] * absmax[..., None]


class ScaleByAdam8bitState(NamedTuple):
  """State of :func:`scale_by_adam_8bit`.

  A leaf with at least ``min_8bit_size`` elements (and at least one) keeps each moment as uint8
  codes of its flattened values, zero-padded to whole blocks (``[blocks, block_size]``, the
  last block partly padding), with one float32 absmax per block; a smaller leaf keeps float32
  moments shaped like the leaf and an empty ``(0,)`` absmax.

  Attributes:
    count: Number of updates so far (int32 scalar).
    mu: Per leaf, the first moment: uint8 codes of the signed dynamic map, or float32.
    mu_absmax: Per leaf, the first moment's float32 per-block scales (``(0,)``: 32-bit leaf).
    nu: Per leaf, the second moment: uint8 codes of the unsigned dynamic map, or float32.
    nu_absmax: Per leaf, the second moment's per-block scales.
  """
  count: chex.Array
  mu: optax.Updates
  mu_absmax: optax.Updates
  nu: optax.Updates
  nu_absmax: optax.Updates


def is_quantised(moment: jax.Array) -> bool:
  """Whether a moment leaf of :class:`ScaleByAdam8bitState` holds 8-bit codes."""
  return jnp.dtype(moment.dtype) == jnp.uint8


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    min_8bit_size: int = DEFAULT_MIN_8BIT_SIZE,
) -> optax.GradientTransformation:
  r"""Adam's scaling with both moments stored in 8 bits (blockwise dynamic quantisation).

  The scheme of bitsandbytes' ``Adam8bit`` (Dettmers et al. 2022): each moment is kept as one
  uint8 code per element, an index into a 256-value dynamic (tree) map, plus one float32
  absmax per block of ``block_size`` consecutive elements of the flattened leaf; the first
  moment uses the signed map, the second the unsigned one. Every step dequantises both moments
  to float32, updates them and computes the update in float32 exactly as
  ``optax.scale_by_adam`` does,

  .. math::
    m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad v \leftarrow \beta_2 v + (1 - \beta_2) g^2,
    \quad u = \frac{m / (1 - \beta_1^t)}{\sqrt{v / (1 - \beta_2^t)} + \epsilon},

  then quantises the new moments again (nearest code, fresh scales). Memory: 2 bytes per
  element plus 8 bytes per block, about a quarter of float32 Adam's 8 bytes.

  Leaves with fewer than ``min_8bit_size`` elements keep float32 moments, as bitsandbytes does
  (its default 4096): norm scales and biases cost little and quantise poorly. A leaf whose size
  is not a multiple of ``block_size`` ends in a partial block (zero-padded in the state; the
  padding does not change the block's scale), as bitsandbytes handles any size, so
  ``block_size`` only has to be a positive integer. Gradients of any float dtype are accepted;
  the update comes back in the gradient's dtype.

  The codes are laid out by blocks of the flattened leaf, not like the parameter:
  :func:`ngalore_jax.state_shardings` replicates them and their scales, and under an
  ``Explicit`` mesh the update gathers each 8-bit leaf's gradient (the update itself comes back
  sharded like the gradient). Inside :func:`ngalore_jax.galore_projection` the state is the
  coefficients', and ``refresh_policy="rotate"`` dequantises, rotates and requantises it.

  Non-finite gradients make the affected blocks' moments NaN for good; wrap the optimizer in
  ``optax.apply_if_finite`` to skip such steps (the 8-bit state is then left unchanged).

  Args:
    b1: Decay of the first moment, in ``[0, 1)``.
    b2: Decay of the second moment, in ``[0, 1)``.
    eps: Added to the bias-corrected root of the second moment, ``>= 0``.
    block_size: Elements per quantisation block (>= 1; bitsandbytes' CPU and GPU kernels use
      256).
    min_8bit_size: Leaves with fewer elements keep float32 moments (>= 0; ``0`` quantises every
      non-empty leaf).

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`ScaleByAdam8bitState`.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> params = {"w": jnp.ones((64, 128)), "b": jnp.zeros((128,))}
    >>> tx = optax.chain(ng.scale_by_adam_8bit(), optax.scale_by_learning_rate(1e-3))
    >>> state = tx.init(params)
    >>> adam_state = state[0]
    >>> adam_state.mu["w"].dtype, adam_state.mu["w"].shape, adam_state.mu_absmax["w"].shape
    (dtype('uint8'), (32, 256), (32,))
    >>> adam_state.mu["b"].dtype  # 128 elements: below min_8bit_size, float32
    dtype('float32')
    >>> grads = {"w": jnp.full((64, 128), 0.5), "b": jnp.ones((128,))}
    >>> updates, state = tx.update(grads, state, params)
    >>> round(float(updates["w"][0, 0]), 6)  # Adam's first step: -lr * sign(g)
    -0.001

  References:
    Dettmers et al., `8-bit Optimizers via Block-wise Quantization
    <https://arxiv.org/abs/2110.02861>`_, 2022.
  """
  _checks.check_range("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_range("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_range("eps", eps, 0.0, float("inf"), high_open=True)
  _checks.check_positive_int("block_size", block_size)
  if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
    raise ValueError(f"`min_8bit_size` must be an integer >= 0, got {min_8bit_size!r}.")

  def quantised_leaf(p) -> bool:
    return p.size >= max(min_8bit_size, 1)

  def init_fn(params):
    def init_moment(p, signed):
      if not quantised_leaf(p):
        return jnp.zeros_like(p, dtype=jnp.float32), jnp.zeros((0,), jnp.float32)
      return quantize_blockwise(
          jnp.zeros((num_blocks(p.size, block_size), block_size), jnp.float32), signed=signed)

    mu, mu_absmax = _tree.map_unzip(lambda p: init_moment(p, True), params)
    nu, nu_absmax = _tree.map_unzip(lambda p: init_moment(p, False), params)
    return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=mu, mu_absmax=mu_absmax,
                                nu=nu, nu_absmax=nu_absmax)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    correction1 = 1.0 - jnp.asarray(b1, jnp.float32) ** t
    correction2 = 1.0 - jnp.asarray(b2, jnp.float32) ** t

    def update_leaf(g, mu, mu_absmax, nu, nu_absmax):
      quantised = is_quantised(mu)
      g32 = to_blocks(g.astype(jnp.float32), block_size) if quantised else g.astype(jnp.float32)
      if quantised:
        m = dequantize_blockwise(mu, mu_absmax, signed=True)
        v = dequantize_blockwise(nu, nu_absmax, signed=False)
      else:
        m, v = mu, nu
      m = b1 * m + (1.0 - b1) * g32
      v = b2 * v + (1.0 - b2) * g32 * g32
      u = (m / correction1) / (jnp.sqrt(v / correction2) + eps)
      if quantised:
        u = from_blocks(u, g.shape, like=g)
        mu, mu_absmax = quantize_blockwise(m, signed=True)
        nu, nu_absmax = quantize_blockwise(v, signed=False)
      else:
        mu, nu = m, v
      return u.astype(g.dtype), mu, mu_absmax, nu, nu_absmax

    new_updates, mu, mu_absmax, nu, nu_absmax = _tree.map_unzip(
        update_leaf, updates, state.mu, state.mu_absmax, state.nu, state.nu_absmax,
        num_outputs=5)
    return new_updates, ScaleByAdam8bitState(count=count, mu=mu, mu_absmax=mu_absmax, nu=nu,
                                             nu_absmax=nu_absmax)

  return optax.GradientTransformation(init_fn, update_fn)


def rotate_state(state: ScaleByAdam8bitState, plan: Any, rotation: Any) -> ScaleByAdam8bitState:
  """Moves the moments into a new projection basis (``galore_projection``'s ``"rotate"``).

  As for optax's Adam: the first moment rotates linearly, the second with ``R * R`` (it stays
  non-negative). 8-bit moments are dequantised, rotated in float32 on the coefficients' shape
  and quantised again with fresh scales; float32 ones rotate as they are.
  """
  shape = tuple(plan.coefficient_shape())

  def rotate(moment, absmax, squared):
    if not is_quantised(moment):
      return plan.rotate(moment, rotation, squared=squared), absmax
    block_size = moment.shape[-1]
    values = from_blocks(dequantize_blockwise(moment, absmax, signed=not squared), shape)
    rotated = plan.rotate(values, rotation, squared=squared)
    return quantize_blockwise(to_blocks(rotated, block_size), signed=not squared)

  mu, mu_absmax = _tree.map_unzip(lambda m, a: rotate(m, a, False), state.mu, state.mu_absmax)
  nu, nu_absmax = _tree.map_unzip(lambda m, a: rotate(m, a, True), state.nu, state.nu_absmax)
  return state._replace(mu=mu, mu_absmax=mu_absmax, nu=nu, nu_absmax=nu_absmax)
