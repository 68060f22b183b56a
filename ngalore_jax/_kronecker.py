"""A one-sided Kronecker factor of the curvature (Shampoo/SOAP-style), sized by the rank only."""

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from ngalore_jax import _checks
from ngalore_jax import _sharding
from ngalore_jax import _tree
from ngalore_jax._woodbury import DAMPING_MODES

KRONECKER_SIDES = ("auto", "rows", "cols")


class KroneckerState(NamedTuple):
  """State of :func:`kronecker_precondition`.

  The factor :math:`L` of a leaf is stored as ``scale**2 * factor`` with ``factor``'s largest
  diagonal entry 1, so that neither huge nor tiny gradients overflow or underflow float32. Every
  field but ``count`` is a pytree like the updates, with ``None`` where it does not apply (a
  leaf passed through, the side that has no factor, the root when it is not cached).

  Attributes:
    count: Number of updates so far (the EMA's bias correction, the root's refresh schedule).
    rows: Per leaf, the normalised factor over the rows (axis -2) of its matrices, float32 of
      shape ``(*batch, a, a)`` for a leaf ``(*batch, a, b)``; ``None`` when the factor is over
      the columns.
    cols: Per leaf, the same over the columns (axis -1), ``(*batch, b, b)``; ``None`` when the
      factor is over the rows.
    scale: Per leaf, float32 of shape ``batch``: :math:`L = \\text{scale}^2 \\cdot` factor.
    inverse_root: Per leaf, with ``root_every > 1``: the cached
      :math:`\\sigma (\\lambda I + L/(1-\\beta^t))^{p}` (``(*batch, d, d)``), else ``None``.
    root_scale: Per leaf, with ``root_every > 1``: the :math:`\\sigma` of ``inverse_root``
      (shape ``batch``); zero marks the root as stale (it is recomputed on the next update).
  """
  count: chex.Array
  rows: Any
  cols: Any
  scale: Any
  inverse_root: Any
  root_scale: Any


def kronecker_precondition(
    *,
    beta: float = 0.95,
    damping: float = 1e-3,
    exponent: float = -0.5,
    damping_mode: str = "relative",
    side: str = "auto",
    root_every: int = 1,
) -> optax.GradientTransformation:
  r"""Preconditions each matrix with a one-sided Kronecker factor of its gradients' covariance.

  A curvature estimate whose memory does not grow with a history: for each matrix leaf
  :math:`C` (``a x b``) keep the exponential moving average of one side's outer products, and
  precondition with its damped power (Shampoo's one-sided factor, Gupta et al. 2018):

  .. math::
    L_t = \beta L_{t-1} + (1-\beta)\, C_t C_t^\top, \qquad
    \tilde C_t = (\lambda I + \hat L_t)^{p}\, C_t, \qquad \hat L_t = L_t / (1 - \beta^t),

  with :math:`p = -1/2` by default (the full-matrix Adagrad/Shampoo power; ``-1`` is allowed) and
  :math:`\hat L_t` bias-corrected like Adam's moments, so that after one step
  :math:`\hat L = C C^\top` and the update is :math:`C` with its singular values
  :math:`\sigma_i` mapped to :math:`\sigma_i / \sqrt{\lambda + \sigma_i^2}` (about 1).

  **Side.** ``side="auto"`` puts the factor on the smaller of the two dimensions (the rows on a
  tie); ``"rows"`` (:math:`C C^\top`) or ``"cols"`` (:math:`C^\top C`) force one. Inside
  :func:`galore_projection` the coefficients are ``r x n`` or ``m x r`` with ``r <= min(m, n)``,
  so ``"auto"`` picks the rank side: an ``r x r`` factor per matrix. Its memory is
  ``4 * (d**2 + 1)`` bytes per matrix (``d`` the factor's side, ``r`` in GaLore), twice that
  with ``root_every > 1``, whatever the history length or the step count.

  **Rotation.** Under ``galore_projection(..., refresh_policy="rotate")`` a refresh maps the
  rank-side coefficients by :math:`R = P_\text{new}^\top P_\text{old}`, so a rank-side factor
  becomes :math:`R L R^\top`. A factor on the other (full-size) side is kept as it is: the
  coefficients move as :math:`C R^\top`, and :math:`R^\top R \ne I` in general cannot be
  applied to :math:`C^\top C` without the history it summarises (exact when the subspace did
  not change). Under ``proj_type="full"`` both sides of the ``r x r`` coefficients are rank
  sides: the factor follows :math:`R_l` (rows) or :math:`R_r` (columns). A Tucker-projected
  core's projected leading modes mix its matrices, which a per-matrix factor cannot follow:
  there the factor is kept too.

  **Other shapes.** A leaf with more than 2 dims is a batch of matrices over its last two axes,
  one factor per matrix (GaLore's stacked ``[layers, r, n]`` coefficients; a Tucker core the
  same way). 0-D and 1-D leaves and zero-size leaves are passed through unchanged, with no
  state.

  **Numerics.** The factor is stored normalised with a float32 scale (see
  :class:`KroneckerState`), and its power is formed from logarithms, so gradients from 1e-30
  to 1e30 give finite results. The power comes from ``eigh`` in float32. ``damping`` is
  absolute, or relative to :math:`\hat L`'s top eigenvalue (the default: scale-invariant); it
  is floored at ``d * eps * top eigenvalue`` (float32's resolution of :math:`\hat L`), below
  which rounding noise would be amplified. With ``root_every = k > 1`` the power is computed
  every ``k`` steps and stored (it is recomputed at once after a rotation or a reset).

  Args:
    beta: EMA decay :math:`\beta` in ``[0, 1)``; ``0`` uses the current gradient only.
    damping: :math:`\lambda > 0`: absolute, or relative (``damping_mode``).
    exponent: Power ``p`` in ``[-1, 0)``: ``-0.5`` (Shampoo, default) or ``-1``.
    damping_mode: ``"relative"`` (default) or ``"absolute"``.
    side: ``"auto"``, ``"rows"`` or ``"cols"`` (see above).
    root_every: Steps between recomputations of the power (>= 1). ``1`` stores none.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ngalore_jax as ng
    >>> tx = ng.kronecker_precondition()
    >>> c = jnp.array([[3.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # factor over the 2 rows
    >>> state = tx.init(c)
    >>> state.rows.shape
    (2, 2)
    >>> updates, state = tx.update(c, state)
    >>> # (lam I + C C^T)^{-1/2} C with lam = 1e-3 * 16: each singular value close to 1.
    >>> [round(float(updates[0, 0]), 4), round(float(updates[1, 1]), 4)]
    [0.9991, 0.9995]
    >>> inner = optax.chain(ng.kronecker_precondition(), optax.scale_by_adam())
    >>> tx = ng.galore_projection(inner, rank=2)

  References:
    Gupta, Koren and Singer, `Shampoo: Preconditioned Stochastic Tensor Optimization
    <https://arxiv.org/abs/1802.09568>`_, 2018.

    Vyas et al., `SOAP: Improving and Stabilizing Shampoo using Adam
    <https://arxiv.org/abs/2409.11321>`_, 2024.
  """
  _checks.check_finite("beta", beta)
  _checks.check_range("beta", beta, 0.0, 1.0, high_open=True)
  _checks.check_finite("damping", damping)
  _checks.check_positive("damping", damping)
  _checks.check_finite("exponent", exponent)
  _checks.check_range("exponent", exponent, -1.0, 0.0, high_open=True)
  _checks.check_choice("damping_mode", damping_mode, DAMPING_MODES)
  _checks.check_choice("side", side, KRONECKER_SIDES)
  _checks.check_positive_int("root_every", root_every)
  cached = root_every > 1

  def init_fn(params):
    def init_leaf(p):
      axis = _factor_axis(p.shape, side)
      if axis is None:
        return None, None, None, None, None
      batch_axes = _batch_axes(p)
      d = p.shape[-2] if axis == "rows" else p.shape[-1]
      square = lambda: _sharding.zeros(p.shape[:-2] + (d, d), jnp.float32, like=p,
                                       axes_per_dim=batch_axes + [(), ()])
      vector = lambda: _sharding.zeros(p.shape[:-2], jnp.float32, like=p,
                                       axes_per_dim=batch_axes)
      factor = square()
      return (factor if axis == "rows" else None, factor if axis == "cols" else None,
              vector(), square() if cached else None, vector() if cached else None)

    rows, cols, scale, root, root_scale = _tree.map_unzip(init_leaf, params, num_outputs=5)
    return KroneckerState(count=jnp.zeros([], jnp.int32), rows=rows, cols=cols, scale=scale,
                          inverse_root=root, root_scale=root_scale)

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    bias = 1.0 - jnp.asarray(beta, jnp.float32) ** count.astype(jnp.float32)
    due = state.count % root_every == 0

    def precondition_leaf(g, rows, cols, scale, root, root_scale):
      axis = _factor_axis(g.shape, side)
      if axis is None:
        return g, rows, cols, scale, root, root_scale
      c = g.astype(jnp.float32)
      if axis == "cols":
        c = jnp.swapaxes(c, -1, -2)
      factor, scale = _accumulate(rows if axis == "rows" else cols, scale, c, beta)
      # The bias-corrected factor is (scale / sqrt(bias))**2 * factor.
      sigma = scale / jnp.sqrt(bias)
      compute = lambda: (_scaled_root(factor, sigma, damping, exponent, damping_mode), sigma)
      if cached:
        stale = due | jnp.any(root_scale == 0)
        root, root_scale = jax.lax.cond(stale, compute, lambda: (root, root_scale))
        applied, applied_scale = root, root_scale
      else:
        applied, applied_scale = compute()
      safe = jnp.where(applied_scale > 0, applied_scale, 1.0)[..., None, None]
      out = _sharding.einsum("...ij,...jk->...ik", applied, c / safe,
                             out_axes=_matrix_axes(c))
      if axis == "cols":
        out = jnp.swapaxes(out, -1, -2)
      rows, cols = (factor, None) if axis == "rows" else (None, factor)
      return out.astype(g.dtype), rows, cols, scale, root, root_scale

    outputs = _tree.map_unzip(precondition_leaf, updates, state.rows, state.cols, state.scale,
                              state.inverse_root, state.root_scale, num_outputs=6)
    new_updates, rows, cols, scale, root, root_scale = outputs
    return new_updates, KroneckerState(count=count, rows=rows, cols=cols, scale=scale,
                                       inverse_root=root, root_scale=root_scale)

  return optax.GradientTransformation(init_fn, update_fn)


def rotate_state(state: KroneckerState, plan: Any, rotation: Any) -> KroneckerState:
  """Moves a Kronecker factor into a new projection basis (``galore_projection``'s rotate).

  ``plan.axis_rotations(rotation)`` says which coefficient axis a refresh moves, and by which
  matrix ``R``: the rows (``-2``) of a left projection's ``r x n`` coefficients, the columns
  (``-1``) of a right projection's ``m x r``, both for a two-sided ``r x r``. A factor over a
  moved axis becomes ``R L R^T`` (and its cached root is marked stale); a factor over an axis
  that did not move (the full-size side), or a plan that moves none (a Tucker core whose
  leading modes are projected), is kept.
  """
  rotations = plan.axis_rotations(rotation)
  is_none = lambda x: x is None

  def rotate_leaf(r, factor, scale, root_scale):
    if factor is None:
      return factor, scale, root_scale
    moved = jnp.einsum("...ab,...bc,...dc->...ad", r, factor, r)
    moved, scale = _renormalise(moved, scale)
    return moved, scale, None if root_scale is None else jnp.zeros_like(root_scale)

  for field, axis in (("rows", -2), ("cols", -1)):
    r = rotations.get(axis)
    if r is None:
      continue
    factors, treedef = jax.tree.flatten(getattr(state, field), is_leaf=is_none)
    scales = treedef.flatten_up_to(state.scale)
    root_scales = treedef.flatten_up_to(state.root_scale)
    moved = [rotate_leaf(r, *args) for args in zip(factors, scales, root_scales)]
    state = state._replace(**{
        field: treedef.unflatten([m[0] for m in moved]),
        "scale": treedef.unflatten([m[1] for m in moved]),
        "root_scale": treedef.unflatten([m[2] for m in moved])})
  return state


def _factor_axis(shape, side: str) -> Optional[str]:
  """``"rows"``, ``"cols"``, or ``None`` for a leaf that is passed through."""
  if len(shape) < 2 or math.prod(shape) == 0:
    return None
  if side != "auto":
    return side
  return "rows" if shape[-2] <= shape[-1] else "cols"


def _batch_axes(x) -> list:
  """Mesh axes of ``x``'s leading (batch) dims on an explicit mesh, else ``[]``."""
  sharding = _sharding.explicit_sharding(x)
  if sharding is None:
    return []
  return _sharding.spec_axes(sharding.spec, x.ndim)[:-2]


def _matrix_axes(x) -> Optional[list]:
  sharding = _sharding.explicit_sharding(x)
  return None if sharding is None else _sharding.spec_axes(sharding.spec, x.ndim)


def _renormalise(factor, scale):
  """Rescales ``(factor, scale)`` so that ``factor``'s largest diagonal entry is 1 (0: all-zero)."""
  peak = jnp.max(jnp.diagonal(factor, axis1=-2, axis2=-1), axis=-1)
  positive = peak > 0
  safe = jnp.where(positive, peak, 1.0)
  return factor / safe[..., None, None], jnp.where(positive, scale * jnp.sqrt(safe), 0.0)


def _accumulate(factor, scale, c, beta):
  """One EMA step of ``scale**2 * factor`` with ``c c^T`` (``c``: ``(*batch, d, k)``)."""
  peak = jnp.max(jnp.abs(c), axis=(-2, -1))
  common = jnp.maximum(scale, peak)
  common = jnp.where(common > 0, common, 1.0)
  ratio = scale / common  # <= 1: the old factor in the common scale
  unit = c / common[..., None, None]
  outer = _sharding.einsum("...ik,...jk->...ij", unit, unit,
                           out_axes=_batch_axes(c) + [(), ()])
  factor = beta * (ratio * ratio)[..., None, None] * factor + (1.0 - beta) * outer
  return _renormalise(factor, common)


def _scaled_root(factor, sigma, damping, exponent, damping_mode):
  """``sigma * (damping I + sigma**2 factor)**exponent`` (relative damping: times the top
  eigenvalue), formed from logarithms so that it is finite for any finite ``sigma``."""
  eigenvalues, eigenvectors = jnp.linalg.eigh(factor)
  eigenvalues = jnp.maximum(eigenvalues, 0.0)
  top = eigenvalues[..., -1]
  d = factor.shape[-1]
  log_sigma = jnp.log(jnp.where(sigma > 0, sigma, 1.0))
  if damping_mode == "relative":
    log_lam = jnp.log(damping) + jnp.log(top)
  else:
    log_lam = jnp.log(damping) - 2.0 * log_sigma  # damping / sigma**2, the normalised damping
  # Below float32's resolution of the factor, rounding noise would be amplified.
  log_lam = jnp.maximum(log_lam, jnp.log(d * jnp.finfo(jnp.float32).eps * top))
  log_lam = jnp.where(jnp.isfinite(log_lam), log_lam, 0.0)  # all-zero factor: output is zero
  log_power = ((1.0 + 2.0 * exponent) * log_sigma[..., None]
               + exponent * jnp.logaddexp(log_lam[..., None], jnp.log(eigenvalues)))
  power = jnp.exp(log_power)
  return jnp.einsum("...ij,...j,...kj->...ik", eigenvectors, power, eigenvectors)
