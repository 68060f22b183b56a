"""Fira: GaLore's Adam in the subspace plus the gradient outside it, scaled by a norm ratio."""

from typing import Any, NamedTuple, Optional

import chex
import jax.numpy as jnp
import optax

from ngalore_jax import _alias
from ngalore_jax import _checks
from ngalore_jax import _plans
from ngalore_jax import _projection
from ngalore_jax import _sharding

# Fira's limiter: the scaled residual's norm may grow by at most this factor per step.
DEFAULT_NORM_GROWTH_LIMIT = 1.01
# The authors' guard in the norm ratios and the limiter (added to the denominators).
_NORM_EPS = 1e-8


class FiraState(NamedTuple):
  """State of Fira's Adam on one leaf's low-rank coefficients (inside a projection).

  Attributes:
    count: Number of updates so far (Adam's bias correction; the limiter starts at 1).
    mu: Adam's first moment of the coefficients.
    nu: Adam's second moment of the coefficients.
    residual_norm: Per matrix (the leaf's batch shape; ``()`` for a single matrix), the
      Frobenius norm of the previous scaled residual after the limiter, before the bias
      correction: the reference of the norm-growth limiter.
  """
  count: chex.Array
  mu: Any
  nu: Any
  residual_norm: chex.Array


# With refresh_policy="rotate" the moments move to the new basis like optax's Adam state; the
# residual norm is a full-space quantity and stays as it is.
# pylint: disable-next=protected-access
_projection._ROTATION_RULES[FiraState] = {"mu": "linear", "nu": "quadratic"}


def check_hyperparameters(*, scale, norm_growth_limit, b1, b2, eps) -> None:
  """Construction-time checks shared by Fira and APOLLO."""
  _checks.check_finite("scale", scale)
  _checks.check_positive("scale", scale)
  if norm_growth_limit is not None:
    _checks.check_finite("norm_growth_limit", norm_growth_limit)
    _checks.check_range("norm_growth_limit", norm_growth_limit, 1.0, float("inf"))
  _checks.check_range("b1", b1, 0.0, 1.0, high_open=True)
  _checks.check_range("b2", b2, 0.0, 1.0, high_open=True)
  _checks.check_finite("eps", eps)
  _checks.check_range("eps", eps, 0.0, float("inf"))


def step_size(count, b1, b2):
  """Adam's bias correction as one factor, ``sqrt(1 - b2^t) / (1 - b1^t)`` (``t = count``).

  The authors' Adam (that of ``transformers.AdamW``) adds ``eps`` to the uncorrected
  ``sqrt(nu)`` and multiplies the whole update by this factor; their norm ratios and limiter
  see the uncorrected ``mu / (sqrt(nu) + eps)``.
  """
  t = count.astype(jnp.float32)
  return jnp.sqrt(1.0 - jnp.power(b2, t)) / (1.0 - jnp.power(b1, t))


def adam_moments(g, mu, nu, *, b1, b2, eps):
  """One step of Adam's moments and the uncorrected direction ``mu / (sqrt(nu) + eps)``."""
  g32 = g.astype(jnp.float32)
  new_mu = b1 * mu.astype(jnp.float32) + (1.0 - b1) * g32
  new_nu = b2 * nu.astype(jnp.float32) + (1.0 - b2) * jnp.square(g32)
  direction = new_mu / (jnp.sqrt(new_nu) + eps)
  return direction, new_mu.astype(mu.dtype), new_nu.astype(nu.dtype)


def _rank_axis(plan) -> int:
  """The rank axis of the coefficients (matrix layout)."""
  return -2 if plan.side == "left" else -1


def _as_leaf_factor(plan, x, like):
  """``x`` (matrix layout, each of the two matrix dims full or 1) broadcastable against ``like``.

  Under an explicit mesh the factor takes ``like``'s split on its full-size dims, so that the
  product with ``like`` needs no resharding of the full-size operand.
  """
  if plan.perm is not None:
    return plan.from_matrix(jnp.broadcast_to(x, plan.batch_shape + (plan.m, plan.n)))
  sharding = _sharding.explicit_sharding(like)
  if sharding is None:
    return x
  axes = _sharding.spec_axes(sharding.spec, like.ndim)
  axes = [a if size == full else () for a, size, full in zip(axes, x.shape, like.shape)]
  return _sharding.reshard(x, sharding.mesh, axes)


def norm_ratio(plan, direction, coefficients, like, *, per_channel: bool = True):
  """``||direction|| / (||coefficients|| + 1e-8)``, as a factor broadcastable against ``like``.

  ``per_channel``: norms over the rank axis, one ratio per row or column of the full-size
  dimension (Fira; APOLLO's ``"channel"``); else one ratio per matrix (APOLLO's ``"tensor"``).
  """
  axes = (_rank_axis(plan),) if per_channel else (-2, -1)
  norm = lambda x: jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=axes,
                                    keepdims=True))
  return _as_leaf_factor(plan, norm(direction) / (norm(coefficients) + _NORM_EPS), like)


def _matrix_axes(plan, ndim: int) -> tuple[int, ...]:
  """The axes of a leaf-layout array that form its matrices (the others are batch axes)."""
  if plan.perm is None:
    return (ndim - 2, ndim - 1)
  return tuple(sorted(plan.perm[len(plan.batch_shape):]))


def limit_norm_growth(plan, x, previous_norm, first, limit):
  """Fira's norm-growth limiter on ``x`` (leaf layout), per matrix.

  If ``||x||`` exceeds ``limit`` times the previous (limited) norm, ``x`` is scaled down to
  exactly that; nothing happens at the first step. Returns ``(x, its norm)``; ``limit=None``
  returns ``x`` unchanged.
  """
  axes = _matrix_axes(plan, x.ndim)
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=axes))
  if limit is None:
    return x, norm
  factor = jnp.maximum(norm / (previous_norm + _NORM_EPS), limit) / limit
  factor = jnp.where(first, jnp.ones_like(factor), factor)
  return x / jnp.expand_dims(factor, axes), norm / factor


def require_matrix(plan, name: str) -> None:
  if not isinstance(plan, _plans.MatrixPlan):
    raise ValueError(
        f"{name} scales a matrix per row or column; a leaf of shape {plan.shape} was given "
        "a Tucker projection. Give it `dimension_numbers=ng.MatrixAxes(...)` or leave it out "
        "of `mask`.")


def _subspace_adam(*, b1, b2, eps, mu_dtype) -> optax.GradientTransformation:
  """Adam as in the authors' code, with the limiter's norm in its state (:class:`FiraState`)."""

  def init_fn(coefficients):
    dtype = mu_dtype or coefficients.dtype
    return FiraState(count=jnp.zeros([], jnp.int32),
                     mu=jnp.zeros_like(coefficients, dtype=dtype),
                     nu=jnp.zeros_like(coefficients),
                     residual_norm=jnp.zeros(coefficients.shape[:-2], jnp.float32))

  def update_fn(coefficients, state, params=None):
    del params
    count = optax.safe_int32_increment(state.count)
    direction, mu, nu = adam_moments(coefficients, state.mu, state.nu, b1=b1, b2=b2, eps=eps)
    update = step_size(count, b1, b2) * direction
    return update.astype(coefficients.dtype), state._replace(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)


def scale_by_fira(
    *,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    norm_growth_limit: Optional[float] = DEFAULT_NORM_GROWTH_LIMIT,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    proj_type: str = "std",
    refresh_policy: str = _projection.DEFAULT_REFRESH_POLICY,
    svd_method: str = "exact",
    oversampling: int = 8,
    power_iterations: int = 2,
    stagger_refresh: bool = False,
    dimension_numbers: Any = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""Fira's update direction: GaLore-Adam plus the scaled residual of the gradient.

  For each matrix ``G`` with projector ``P`` (as in :func:`galore_projection`), coefficients
  ``C = P^T G`` and Adam's direction ``N`` on them, computed like the authors' code
  (``N = mu / (sqrt(nu) + eps)`` without bias correction, the correction
  :math:`s_t = \sqrt{1 - b_2^t} / (1 - b_1^t)` applied to the whole update):

  .. math::
    \phi = \frac{\|N\|_{\text{rank axis}}}{\|C\|_{\text{rank axis}} + 10^{-8}}, \qquad
    S = \phi \odot (G - \alpha P C), \qquad
    \Delta = s_t \left(\alpha P N + S / \max(1, \|S\| / (\gamma \|S_{t-1}\|))\right)

  with :math:`\alpha` = ``scale``, one ratio :math:`\phi` per row or column of the full-size
  dimension, and :math:`\gamma` = ``norm_growth_limit`` bounding the growth of the residual
  term's Frobenius norm per step (its previous, limited norm is kept per matrix). As in the
  authors' code, the residual is :math:`G - \alpha P P^\top G`: with ``scale < 1`` it keeps a
  share :math:`1 - \alpha` of the in-subspace gradient (the paper's
  :math:`G - P P^\top G` is ``scale=1``). Unprojected leaves get Adam alone.

  Every leaf with ndim >= 2 is a matrix over its last two axes (leading axes are batch axes,
  one projector and one limiter per matrix) unless ``dimension_numbers`` says otherwise; a
  Tucker projection is not supported. The other arguments are :func:`galore_projection`'s
  (``refresh_policy="keep"`` reproduces the authors' code).

  Args:
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha`` (> 0).
    norm_growth_limit: :math:`\gamma` (>= 1); ``None`` disables the limiter.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Added to ``sqrt(nu)`` (uncorrected, as the authors do).
    mu_dtype: dtype of Adam's first moment (``None``: the coefficients').
    proj_type: Which side holds the projector; see :func:`galore_projection`.
    refresh_policy: ``"keep"``, ``"reset"`` or ``"rotate"`` Adam's moments on a refresh.
    svd_method: ``"exact"`` or ``"randomized"``.
    oversampling: Extra random directions of the randomized SVD.
    power_iterations: Subspace iterations of the randomized SVD.
    stagger_refresh: Spread the leaves' refreshes over the gap.
    dimension_numbers: Which axes of each leaf form a matrix: ``None`` (the last two), a
      :class:`MatrixAxes`, or a pytree/callable of those and ``None`` (not projected).
    projector_dtype: dtype of the stored projectors (``None``: the gradient's).
    seed: Seed of the randomized SVD.

  Returns:
    An ``optax.GradientTransformation`` whose state is a :class:`GaLoreProjectionState` with
    a :class:`FiraState` per leaf.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> tx = ng.scale_by_fira(rank=2, update_proj_gap=10)
    >>> params = {"w": jnp.zeros((8, 4))}
    >>> state = tx.init(params)
    >>> state.inner_states["w"].mu.shape  # Adam's moments are low-rank: 8 x r
    (8, 2)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> updates, state = tx.update(grads, state)
    >>> updates["w"].shape
    (8, 4)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?
    <https://arxiv.org/abs/2410.01623>`_, 2024.
  """
  check_hyperparameters(scale=scale, norm_growth_limit=norm_growth_limit, b1=b1, b2=b2, eps=eps)
  # The residual is scaled per row or column of the full-size dimension: one-sided only.
  _checks.check_choice("proj_type", proj_type, _plans.ONE_SIDED_PROJ_TYPES)

  def combine(grad, coefficients, low_rank_update, state, plan, factors):
    require_matrix(plan, "fira")
    s = step_size(state.count, b1, b2)
    residual = grad.astype(jnp.float32) - scale * plan.project_back(coefficients, factors, grad)
    ratio = norm_ratio(plan, low_rank_update.astype(jnp.float32) / s, coefficients, grad)
    scaled, norm = limit_norm_growth(plan, residual * ratio, state.residual_norm,
                                     state.count == 1, norm_growth_limit)
    update = scale * plan.project_back(low_rank_update, factors, grad) + s * scaled
    return update, state._replace(residual_norm=norm)

  return _projection.galore_projection(
      _subspace_adam(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype), rank=rank,
      update_proj_gap=update_proj_gap, scale=scale, proj_type=proj_type,
      refresh_policy=refresh_policy, svd_method=svd_method, oversampling=oversampling,
      power_iterations=power_iterations, stagger_refresh=stagger_refresh,
      dimension_numbers=_plans.MatrixAxes(-2, -1) if dimension_numbers is None
      else dimension_numbers,
      projector_dtype=projector_dtype, seed=seed, combine=combine)


def fira(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    norm_growth_limit: Optional[float] = DEFAULT_NORM_GROWTH_LIMIT,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: _alias.MaskOrFn = None,
    mask: _alias.MaskOrFn = None,
    proj_type: str = "std",
    refresh_policy: str = _projection.DEFAULT_REFRESH_POLICY,
    svd_method: str = "exact",
    oversampling: int = 8,
    power_iterations: int = 2,
    stagger_refresh: bool = False,
    dimension_numbers: Any = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""Fira-Adam: GaLore's low-rank Adam plus the full-rank residual, scaled and limited.

  :func:`scale_by_fira` on the leaves selected by ``mask`` (default: every leaf with
  ndim >= 2), plain Adam on the others, then decoupled weight decay on the full-size
  parameters and the learning rate: the optax counterpart of the authors' ``FiraAdamW``
  (which decays the weights after the step instead of before it, a difference of order
  ``lr^2 * weight_decay`` per step). The state costs what GaLore's does, plus one scalar per
  matrix.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha`` (the authors' pre-training scripts use 0.25, 0.0625 at 1B).
    norm_growth_limit: Fira's :math:`\gamma` (>= 1); ``None`` disables the limiter.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (the authors' default).
    mu_dtype: dtype of Adam's first moment (``None``: the update's dtype).
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay (bool pytree or callable); ``None`` decays all.
    mask: Which leaves are projected (bool pytree or callable of the params); the others get
      plain Adam. ``None`` projects every leaf with ndim >= 2.
    proj_type: Which side holds the projector; see :func:`galore_projection`.
    refresh_policy: ``"keep"`` (the authors' code), ``"reset"`` or ``"rotate"``.
    svd_method: ``"exact"`` or ``"randomized"``.
    oversampling: Extra random directions of the randomized SVD.
    power_iterations: Subspace iterations of the randomized SVD.
    stagger_refresh: Spread the leaves' refreshes over the gap.
    dimension_numbers: Which axes of each leaf form a matrix; see :func:`scale_by_fira`.
    projector_dtype: dtype of the stored projectors (``None``: the gradient's).
    seed: Seed of the randomized SVD.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams``, pass ``rank``,
    ``update_proj_gap``, ``oversampling``, ``power_iterations`` and ``seed`` as
    ``static_args``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    >>> tx = ng.fira(1e-2, rank=4, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.eye(16, 8), "b": jnp.ones((8,))}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].shape
    (16, 8)

  References:
    Chen et al., `Fira: Can We Achieve Full-rank Training of LLMs Under Low-rank Constraint?
    <https://arxiv.org/abs/2410.01623>`_, 2024.
  """
  projection = scale_by_fira(
      rank=rank, update_proj_gap=update_proj_gap, scale=scale,
      norm_growth_limit=norm_growth_limit, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
      proj_type=proj_type, refresh_policy=refresh_policy, svd_method=svd_method,
      oversampling=oversampling, power_iterations=power_iterations,
      stagger_refresh=stagger_refresh, dimension_numbers=dimension_numbers,
      projector_dtype=projector_dtype, seed=seed)
  return _alias._assemble(projection, dict(  # pylint: disable=protected-access
      learning_rate=learning_rate, mask=mask, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
      weight_decay=weight_decay, weight_decay_mask=weight_decay_mask))
