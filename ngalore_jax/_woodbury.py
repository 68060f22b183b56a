"""Natural-gradient preconditioning with the empirical Fisher of a short gradient history."""

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from ngalore_jax import _checks
from ngalore_jax import _sharding
from ngalore_jax import _tree

DAMPING_MODES = ("absolute", "relative")
SOLVERS = ("auto", "cholesky", "eigh")
# The int8 history stores round(g / max|g| * 127): symmetric, so -g is stored as exactly -q.
_INT8_LEVELS = 127.0


class WoodburyState(NamedTuple):
  """State of :func:`woodbury_precondition`.

  Attributes:
    count: Number of gradients seen so far. The next gradient is written at position
      ``count % history_size`` of the ring buffer.
    history: Per leaf, the last ``history_size`` gradients stacked on a new leading axis,
      shape ``(history_size, *leaf.shape)``. Slots not yet written hold zeros, which leave the
      Fisher estimate unchanged. With ``history_dtype=jnp.int8`` a slot holds the quantised
      gradient ``round(127 * g / max|g|)``.
    scales: ``None``, unless the history is int8: then per leaf a float32 vector of shape
      ``(history_size,)`` with each slot's dequantisation scale ``max|g| / 127`` (zero for an
      empty slot): slot ``i`` stands for ``history[i] * scales[i]``.
    gram: Per leaf, the float32 ``(history_size, history_size)`` Gram matrix of the stored
      slots, each normalised by its largest entry: ``<x_i / m_i, x_j / m_j>`` for the
      (dequantised) slots ``x_i`` and ``m_i = maxima[i]`` (zero for an empty slot). Kept up to
      date one row and column per step, so that a step reads the history twice (two matrix-vector
      products) instead of forming ``H^T H``.
    maxima: Per leaf, the float32 vector ``(history_size,)`` of each stored slot's largest
      absolute entry ``m_i`` (zero for an empty slot).
  """
  count: chex.Array
  history: optax.Updates
  scales: Optional[optax.Updates] = None
  gram: Optional[optax.Updates] = None
  maxima: Optional[optax.Updates] = None


def woodbury_precondition(
    history_size: int = 10,
    damping: float = 1e-3,
    *,
    exponent: float = -1.0,
    damping_mode: str = "absolute",
    solver: str = "auto",
    history_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Preconditions each leaf with the inverse empirical Fisher of its recent gradients.

  Natural GaLore's natural-gradient step (Das 2024, eqs. 10-12 and Algorithm 3). Per leaf, the
  gradient ``g`` (flattened to ``k`` entries) is appended to a FIFO history
  :math:`H = [g_{t-s+1}, \dots, g_t] \in \mathbb{R}^{k \times s}` (the current gradient
  included) and replaced by

  .. math::
    \tilde g = (\lambda I_k + H H^\top)^{p}\, g, \qquad p = \text{exponent}.

  With :math:`p = -1` this is the paper's Woodbury step. The :math:`k \times k` matrix is never
  formed: since ``g`` is the last column of ``H``, the push-through identity
  :math:`f(H H^\top) H = H f(H^\top H)` gives :math:`\tilde g = H (\lambda I_s + H^\top H)^{p}
  e_t`, an :math:`s \times s` problem and one :math:`k \times s` product. Unlike eq. 12 as
  printed, :math:`(g - H z)/\lambda`, this form does not cancel catastrophically when
  :math:`\lambda \ll \|g\|^2`. The history is rescaled by its largest entry first, so the
  Gram matrix can neither overflow nor underflow, and the damping of the rescaled problem and
  the powers are formed as logarithms, so that any finite gradient scale (1e-30 to 1e30) gives a
  finite answer.

  The default solver diagonalises the :math:`s \times s` Gram matrix :math:`H^\top H`.
  Directions whose eigenvalue is below float32 resolution (``s * eps * max``) are null
  directions of ``H`` and are dropped: they contribute exactly nothing in exact arithmetic, and
  keeping them would multiply rounding noise by ``1 / damping`` when the history is
  rank-deficient (repeated, collinear or zero gradients). ``solver="cholesky"`` is the paper's
  Cholesky solve of :math:`\lambda I_s + H^\top H`, with the damping floored at
  ``s * eps * trace(H^T H)`` so that it always factorises; it is as accurate on well-conditioned
  histories and loses accuracy (never finiteness) on rank-deficient ones.

  ``p = -1/2`` gives the GGT-style full-matrix square-root preconditioner from the same history.
  The solve always runs in float32; the update has the gradient's dtype. The current gradient
  enters it at full precision; only the stored copies (the older gradients, in later steps) are
  rounded to ``history_dtype``.

  **int8 history.** ``history_dtype=jnp.int8`` quantises each gradient when it is pushed, with one
  absmax scale per stored gradient (per leaf and slot, not blockwise): :math:`q = \mathrm{round}(127
  g / \max|g|)`, stored as int8, and the float32 scale :math:`\max|g| / 127`. Each entry comes
  back to within :math:`\max|g| / 254` (half a quantisation step); the solve sees the
  dequantised history in float32. Memory: ``s`` bytes per coefficient plus 4 bytes per slot, a
  quarter of a float32 history. Since the current gradient is used at full precision, the
  quantisation only perturbs the curvature estimate, never the gradient being preconditioned.

  **Cost per step.** The state keeps the ``s x s`` Gram matrix of the stored slots (each
  normalised by its largest entry) beside the history, and a step replaces one row and column of
  it: the history is written in place (one slot) and read in two matrix-vector products (the
  new gradient's inner products with the slots, and the combination of the slots), instead of
  forming :math:`H^\top H` each step. The solve sees the same matrix up to float32 rounding.

  A zero-size leaf is passed through (its update is the same empty array) and its history is
  empty too.

  Args:
    history_size: Number ``s`` of recent gradients kept per leaf (>= 1). Memory: ``s`` times the
      leaf's size in ``history_dtype``.
    damping: :math:`\lambda > 0`. Absolute, or relative to the largest eigenvalue of
      :math:`H^\top H` when ``damping_mode="relative"``.
    exponent: Power ``p`` of the damped Fisher, in ``[-1, 0)``. ``-1`` is the paper's natural
      gradient.
    damping_mode: ``"absolute"`` (the paper) or ``"relative"`` (scale-invariant).
    solver: ``"eigh"`` (default; ``"auto"`` is the same) or ``"cholesky"`` (the paper's solve,
      ``exponent=-1`` only).
    history_dtype: dtype of the stored history: a floating dtype (``jnp.bfloat16`` halves its
      memory), or ``jnp.int8`` for the quantised history above (a quarter of float32). ``None``
      keeps each gradient's dtype. Other integer dtypes are rejected (rounding a gradient to an
      integer would zero it).

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ngalore_jax as ng
    >>> tx = ng.woodbury_precondition(history_size=4, damping=1e-3)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((3, 2), 2.0)}
    >>> updates, state = tx.update(grads, state)
    >>> # One gradient in the history: (lam I + g g^T)^{-1} g = g / (lam + |g|^2).
    >>> print(jnp.round(updates["w"][0, 0], 5))
    0.08333

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning
    <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  _checks.check_positive_int("history_size", history_size)
  _checks.check_finite("damping", damping)
  _checks.check_positive("damping", damping)
  _checks.check_finite("exponent", exponent)
  _checks.check_range("exponent", exponent, -1.0, 0.0, high_open=True)
  _checks.check_choice("damping_mode", damping_mode, DAMPING_MODES)
  _checks.check_choice("solver", solver, SOLVERS)
  if solver == "cholesky" and exponent != -1.0:
    raise ValueError(f"`solver`='cholesky' needs `exponent`=-1, got exponent={exponent}; "
                     "use solver='eigh' or 'auto'.")
  quantised = history_dtype is not None and _is_int8(history_dtype)
  if history_dtype is not None and not quantised:
    _checks.check_float_dtype("history_dtype", history_dtype)
  use_cholesky = solver == "cholesky"

  def init_fn(params):
    def init_leaf(p):
      dtype = p.dtype if history_dtype is None else history_dtype
      sharding = _sharding.explicit_sharding(p)
      axes = None if sharding is None else [()] + _sharding.spec_axes(sharding.spec, p.ndim)
      return _sharding.zeros((history_size,) + p.shape, dtype, like=p, axes_per_dim=axes)

    history = jax.tree.map(init_leaf, params)
    slots = lambda _: jnp.zeros((history_size,), jnp.float32)
    scales = jax.tree.map(slots, params) if quantised else None
    gram = jax.tree.map(lambda _: jnp.zeros((history_size, history_size), jnp.float32), params)
    return WoodburyState(count=jnp.zeros([], jnp.int32), history=history, scales=scales,
                         gram=gram, maxima=jax.tree.map(slots, params))

  def update_fn(updates, state, params=None):
    del params
    # count >= 0, so the slot is in range: a plain in-place dynamic-update-slice of one row.
    position = state.count % history_size
    slot = jnp.arange(history_size) == position

    def precondition_leaf(g, history, scales, gram, maxima):
      if g.size == 0:
        return g, history, scales, gram, maxima
      g32 = g.astype(jnp.float32)
      absmax = jnp.max(jnp.abs(g32))
      unit_g = g32 / jnp.where(absmax > 0, absmax, 1.0)  # the current gradient, max entry 1
      # Push: the stored slot ``x`` (rounded to the history's dtype) and its largest entry.
      if quantised:
        stored, scale = _quantize(g32, absmax)
        scales = jax.lax.dynamic_update_index_in_dim(scales, scale, position, 0)
        stored_max = _INT8_LEVELS * scale
      else:
        stored = g.astype(history.dtype)
        stored_max = (absmax if history.dtype == g32.dtype else  # else absmax, rounded alike
                      jnp.max(jnp.abs(stored)).astype(jnp.float32))
      history = jax.lax.dynamic_update_index_in_dim(history, stored, position, 0)
      maxima = jnp.where(slot, stored_max, maxima)
      # The normalised slots u_i = x_i / m_i (the int8 values / 127), in float32: one pass
      # over the updated history, which every product below reads (reading the history itself
      # made XLA copy it).
      if quantised:
        factor = jnp.full_like(maxima, 1 / _INT8_LEVELS)
      else:
        factor = 1.0 / jnp.where(maxima > 0, maxima, 1.0)
      units = history.astype(jnp.float32) * factor.reshape((history_size,) + (1,) * g.ndim)
      # Inner products with the current gradient (for this step's solve) and with the stored
      # slot (for the kept Gram): a matrix-vector product each. Slot `position` is replaced.
      cross = _matvec(units, unit_g)
      if quantised or history.dtype != g32.dtype:
        stored_cross = _matvec(units, units[position])
      else:  # the stored slot is the gradient itself
        stored_cross = cross
      gram = _replace_row_and_column(gram, slot, stored_cross)
      # This step's Gram: the current gradient at full precision in its slot.
      solve_gram = _replace_row_and_column(
          gram, slot, jnp.where(slot, jnp.sum(unit_g * unit_g), cross))
      solve_maxima = jnp.where(slot, absmax, maxima)
      # Rescale to the history's largest entry (as natural_direction does): h_i = x_i / c.
      largest = jnp.max(solve_maxima)
      scale = jnp.where(largest > 0, largest, 1.0)
      ratio = solve_maxima / scale
      weights = _weights(solve_gram * ratio[:, None] * ratio[None, :], jnp.log(scale),
                         position, damping, exponent=exponent, damping_mode=damping_mode,
                         use_cholesky=use_cholesky)
      # sum_i weights_i h_i = sum_i weights_i (m_i / c) u_i, the current slot at full precision.
      coefficients = weights * ratio
      direction = (_combine(jnp.where(slot, 0.0, coefficients), units)
                   + coefficients[position] * unit_g)
      return direction.astype(g.dtype), history, scales, gram, maxima

    def per_leaf(tree):
      return jax.tree.map(lambda _: None, updates) if tree is None else tree

    outputs = _tree.map_unzip(
        precondition_leaf, updates, state.history, per_leaf(state.scales),
        per_leaf(state.gram), per_leaf(state.maxima), num_outputs=5)
    new_updates, new_history, new_scales, new_gram, new_maxima = outputs
    count = optax.safe_int32_increment(state.count)
    return new_updates, WoodburyState(count=count, history=new_history,
                                      scales=new_scales if quantised else None,
                                      gram=new_gram, maxima=new_maxima)

  return optax.GradientTransformation(init_fn, update_fn)


def natural_direction(history: jax.Array, position, damping, *, exponent: float = -1.0,
                      damping_mode: str = "absolute", use_cholesky: bool = True) -> jax.Array:
  """Returns ``H (damping I + H^T H)^exponent e_position`` for a stacked history, in float32.

  ``history`` has shape ``(s, *leaf_shape)``; row ``position`` is the current gradient. See
  :func:`woodbury_precondition` for the maths and the safeguards.

  Examples:
    >>> import jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> history = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # two orthogonal gradients
    >>> # (I + H H^T)^{-1} g for g = (0, 2): 2 / (1 + 4) along the second axis.
    >>> [round(float(x), 4) for x in ng.natural_direction(history, 1, 1.0)]
    [0.0, 0.4]
  """
  h = history.astype(jnp.float32)
  # Rescale so the largest entry is 1: the Gram matrix can neither overflow nor underflow.
  scale = jnp.max(jnp.abs(h))
  scale = jnp.where(scale > 0, scale, 1.0)
  h = h / scale
  leaf_axes = _leaf_axes(h)
  dims = "abcdefghklmnopqr"[:h.ndim - 1]
  gram = _sharding.einsum(f"i{dims},j{dims}->ij", h, h, out_axes=[(), ()])
  weights = _weights(gram, jnp.log(scale), position, damping, exponent=exponent,
                     damping_mode=damping_mode, use_cholesky=use_cholesky)
  return _sharding.einsum(f"i,i{dims}->{dims}", weights, h, out_axes=leaf_axes)


def _leaf_axes(x: jax.Array) -> list[tuple[str, ...]]:
  """Mesh axes of a stacked history's leaf dims (none off an explicit mesh)."""
  sharding = _sharding.explicit_sharding(x)
  return [] if sharding is None else _sharding.spec_axes(sharding.spec, x.ndim)[1:]


def _matvec(rows: jax.Array, vector: jax.Array) -> jax.Array:
  """``<rows[i], vector>`` for each slot ``i`` of a stacked ``(s, *leaf)`` history."""
  dims = "abcdefghklmnopqr"[:vector.ndim]
  return _sharding.einsum(f"i{dims},{dims}->i", rows, vector, out_axes=[()])


def _combine(weights: jax.Array, rows: jax.Array) -> jax.Array:
  """``sum_i weights[i] rows[i]`` over the slots of a stacked history."""
  dims = "abcdefghklmnopqr"[:rows.ndim - 1]
  return _sharding.einsum(f"i,i{dims}->{dims}", weights, rows, out_axes=_leaf_axes(rows))


def _replace_row_and_column(gram: jax.Array, slot: jax.Array, values: jax.Array) -> jax.Array:
  """``gram`` with row and column ``slot`` (a one-hot mask) set to ``values`` (symmetric)."""
  return jnp.where(slot[:, None], values[None, :], jnp.where(slot[None, :], values[:, None], gram))


def _weights(gram, log_scale, position, damping, *, exponent, damping_mode, use_cholesky):
  """The weights ``w`` of the direction ``sum_i w_i h_i`` (see :func:`natural_direction`).

  ``h`` is the history rescaled so that its largest entry is 1, ``gram = h^T h`` (``s x s``),
  ``log_scale`` the logarithm of that scale.
  """
  s = gram.shape[0]
  eps = jnp.finfo(jnp.float32).eps
  # The damping of the rescaled problem, lam / scale**2, and the powers below are formed as
  # logarithms: lam / scale**2 overflows float32 for gradients around 1e-20 (lam = 1e-3), and
  # the answer (about g / lam there) is still an ordinary number.
  if damping_mode == "relative":
    log_lam = jnp.log(damping) + jnp.log(jnp.linalg.eigvalsh(gram)[-1])  # -inf: zero history
  else:
    log_lam = jnp.log(damping) - 2.0 * log_scale
  unit = jax.nn.one_hot(position, s, dtype=jnp.float32)
  if use_cholesky:
    # The paper's solve. Floor the damping so the factorisation always exists in float32.
    log_lam = jnp.maximum(log_lam, jnp.log(s * eps * jnp.trace(gram)))
    # All-zero history: any positive value gives zero out.
    log_lam = jnp.where(jnp.isfinite(log_lam), log_lam, 0.0)
    # Solve with (gram + lam I) / max(lam, 1): both terms stay in float32 range.
    log_norm = jnp.maximum(log_lam, 0.0)
    matrix = (gram * jnp.exp(-log_norm)
              + jnp.exp(log_lam - log_norm) * jnp.eye(s, dtype=jnp.float32))
    factor = jax.scipy.linalg.cho_factor(matrix, lower=True)
    # scale ** (1 + 2 * exponent) with exponent = -1, and the normalisation of the matrix.
    weights = jax.scipy.linalg.cho_solve(factor, unit) * jnp.exp(-log_scale - log_norm)
  else:
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    # Directions of H^T H below float32 resolution are null directions of H: H v = 0 there, so
    # they contribute nothing. Keeping them would multiply rounding noise by 1 / damping.
    resolved = eigenvalues > s * eps * jnp.max(eigenvalues)
    log_eigenvalues = jnp.log(jnp.where(resolved, eigenvalues, 1.0))
    # scale ** (1 + 2p) (lam / scale**2 + e) ** p: the power of the unscaled problem.
    log_powered = ((1.0 + 2.0 * exponent) * log_scale
                   + exponent * jnp.logaddexp(log_lam, log_eigenvalues))
    powered = jnp.where(resolved, jnp.exp(log_powered), 0.0)
    weights = eigenvectors @ (powered * (eigenvectors.T @ unit))
  return weights


def rotate_state(state: WoodburyState, plan: Any, rotation: Any) -> WoodburyState:
  """Moves a history into a new projection basis (``galore_projection``'s ``"rotate"``).

  Each stored gradient is a coefficient vector, so it rotates linearly with ``plan.rotate``.
  An int8 history is dequantised, rotated in float32 and quantised again, slot by slot (a fresh
  absmax scale per slot). The kept Gram matrix and slot maxima are recomputed from the result.
  """
  if state.scales is None:
    history = jax.tree.map(lambda h: plan.rotate(h, rotation), state.history)
    scales = None
  else:
    def rotate_quantised(q, scales):
      if q.size == 0:
        return q, scales
      return jax.vmap(_quantize)(plan.rotate(_dequantize(q, scales), rotation))

    history, scales = _tree.map_unzip(rotate_quantised, state.history, state.scales)
  per_leaf = jax.tree.map(lambda _: None, history) if scales is None else scales
  gram, maxima = _tree.map_unzip(_slot_statistics, history, per_leaf)
  return state._replace(history=history, scales=scales, gram=gram, maxima=maxima)


def _slot_statistics(history: jax.Array, scales: Optional[jax.Array]):
  """The normalised Gram matrix and slot maxima of a stacked history, from scratch."""
  s = history.shape[0]
  rows = history.astype(jnp.float32)
  if scales is not None:
    maxima = _INT8_LEVELS * scales
    units = rows / _INT8_LEVELS
  else:
    maxima = jnp.max(jnp.abs(rows.reshape(s, -1)), axis=1) if rows.size else jnp.zeros(s)
    factor = 1.0 / jnp.where(maxima > 0, maxima, 1.0)
    units = rows * factor.reshape((s,) + (1,) * (rows.ndim - 1))
  dims = "abcdefghklmnopqr"[:rows.ndim - 1]
  gram = _sharding.einsum(f"i{dims},j{dims}->ij", units, units, out_axes=[(), ()])
  return gram, maxima


def _is_int8(dtype: Any) -> bool:
  try:
    return jnp.dtype(dtype) == jnp.int8
  except TypeError:
    return False


def _quantize(g: jax.Array, absmax: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """One gradient (float32) to int8 with a per-vector absmax scale: returns ``(q, scale)``."""
  if absmax is None:
    absmax = jnp.max(jnp.abs(g))
  safe = jnp.where(absmax > 0, absmax, 1.0)
  q = jnp.clip(jnp.round(g / safe * _INT8_LEVELS), -_INT8_LEVELS, _INT8_LEVELS)
  return q.astype(jnp.int8), absmax / _INT8_LEVELS


def _dequantize(q: jax.Array, scales: jax.Array) -> jax.Array:
  """A stacked int8 history ``(s, ...)`` and its scales ``(s,)`` back to float32."""
  return q.astype(jnp.float32) * scales.reshape(scales.shape + (1,) * (q.ndim - 1))
