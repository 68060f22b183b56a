"""APOLLO: Adam's moments on a projected gradient give scaling factors for the raw gradient."""

import math
from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from ngalore_jax import _alias
from ngalore_jax import _checks
from ngalore_jax import _fira
from ngalore_jax import _plans
from ngalore_jax import _projection
from ngalore_jax import _tree

APOLLO_PROJECTIONS = ("random", "svd")
APOLLO_SCALE_TYPES = ("channel", "tensor")
# APOLLO-Mini's scale: the authors' scripts pass 128, which their code applies as sqrt(128).
APOLLO_MINI_SCALE = math.sqrt(128.0)


class ApolloState(NamedTuple):
  """State of :func:`scale_by_apollo`.

  Attributes:
    count: Number of updates so far: the refresh schedule, Adam's bias correction, and (with
      ``projection="random"``) which random projection is in use, ``count //
      update_proj_gap``.
    projectors: Per leaf, a 1-tuple holding the ``[..., d, r]`` SVD basis with
      ``projection="svd"``; empty with ``projection="random"`` (the random matrix is
      regenerated from ``seed``, the leaf's index and the refresh number at every step) and
      for unprojected leaves.
    mu: Per leaf, Adam's first moment of the projected gradient (``[..., r, n]`` or
      ``[..., m, r]``; full-size for unprojected leaves).
    nu: Per leaf, Adam's second moment, shaped like ``mu``.
    scaled_norm: Per projected leaf, the Frobenius norm of the previous scaled gradient after
      the norm-growth limiter, per matrix (the leaf's batch shape; ``()`` for a single
      matrix); empty for unprojected leaves.
  """
  count: chex.Array
  projectors: Any
  mu: Any
  nu: Any
  scaled_norm: Any


def _leaf_specs(dimension_numbers, tree, treedef, leaves):
  """Per leaf: a :class:`MatrixAxes`, or ``None`` (not projected)."""
  if dimension_numbers is None:
    return [_plans.MatrixAxes(-2, -1) if x.ndim >= 2 else None for x in leaves]
  if _projection._is_matrix_axes(dimension_numbers):  # pylint: disable=protected-access
    return [dimension_numbers if x.ndim >= 2 else None for x in leaves]
  dims = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
  specs = [_projection._spec_entry(d)  # pylint: disable=protected-access
           for d in treedef.flatten_up_to(dims)]
  if any(isinstance(s, str) for s in specs):
    raise ValueError("`dimension_numbers`: APOLLO scales matrices per row or column; give "
                     "each leaf a MatrixAxes or None, not a Tucker projection.")
  return specs


def random_projection(shape, *, seed: int, index: int, refresh) -> jax.Array:
  """APOLLO's random projection of leaf ``index`` (in flattening order) at refresh ``refresh``.

  A ``[..., d, r]`` float32 matrix (``shape``; ``d`` the projected side) of independent
  ``N(0, 1 / r)`` entries, as the authors draw it. A function of its arguments only, so it is
  regenerated at every step instead of stored.
  """
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), index), refresh)
  return jax.random.normal(key, shape, jnp.float32) / math.sqrt(shape[-1])


def scale_by_apollo(
    *,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    projection: str = "random",
    norm_growth_limit: Optional[float] = _fira.DEFAULT_NORM_GROWTH_LIMIT,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    proj_type: str = "std",
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""APOLLO's update direction: the raw gradient, scaled per channel (or per matrix).

  For each matrix ``G``, a rank-``r`` projection ``C = P^T G`` (or ``G P``) feeds Adam's
  moments, computed like the authors' code: ``N = mu / (sqrt(nu) + eps)`` without bias
  correction, the correction :math:`s_t = \sqrt{1 - b_2^t} / (1 - b_1^t)` applied to the
  whole update. Their norm ratio scales the full gradient:

  .. math::
    \phi = \frac{\|N\|}{\|C\| + 10^{-8}}, \qquad S = \phi \odot G, \qquad
    \Delta = s_t \cdot \text{scale} \cdot S / \max(1, \|S\| / (\gamma \|S_{t-1}\|))

  with the norms taken over the rank axis, one ratio per row or column of the full-size
  dimension (``scale_type="channel"``), or over the whole matrix (``"tensor"``), and Fira's
  norm-growth limiter :math:`\gamma` = ``norm_growth_limit`` on the Frobenius norm of ``S``.
  Nothing is projected back. Unprojected leaves (ndim < 2) get Adam alone.

  ``projection="random"``: ``P`` has independent ``N(0, 1/r)`` entries, redrawn every
  ``update_proj_gap`` steps from ``seed``, the leaf's index and the refresh number, and never
  stored: the state is Adam's low-rank moments and one scalar per matrix.
  ``projection="svd"``: ``P`` holds the top-``r`` singular vectors of the gradient at each
  refresh (stored, sign-aligned as in :func:`galore_projection`). In both cases Adam's moments
  are kept across refreshes, as the authors do.

  ``scale`` multiplies the update directly. The authors' ``scale`` argument is its square
  (their code multiplies by ``sqrt(scale)``): their APOLLO-Mini setting 128 is
  ``scale=sqrt(128)`` here.

  Every leaf with ndim >= 2 is a matrix over its last two axes (leading axes are batch axes)
  unless ``dimension_numbers`` says otherwise.

  Args:
    rank: Projection rank ``r`` (clipped to the matrix's smaller side).
    update_proj_gap: Steps between refreshes of the projection.
    scale: Multiplies the update (> 0).
    scale_type: ``"channel"`` or ``"tensor"``.
    projection: ``"random"`` or ``"svd"``.
    norm_growth_limit: :math:`\gamma` (>= 1); ``None`` disables the limiter.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Added to ``sqrt(nu)`` (uncorrected, as the authors do).
    mu_dtype: dtype of Adam's first moment (``None``: the gradient's).
    proj_type: Which side is projected; see :func:`galore_projection` (``"std"``, the
      authors' choice, projects the smaller side, so the moments are ``r x max(m, n)``).
    dimension_numbers: ``None`` (the last two axes), a :class:`MatrixAxes` for every leaf
      with ndim >= 2, or a pytree/callable of :class:`MatrixAxes` and ``None`` (not
      projected).
    seed: Seed of the random projections.

  Returns:
    An ``optax.GradientTransformation`` with an :class:`ApolloState`.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> tx = ng.scale_by_apollo(rank=2, update_proj_gap=10)
    >>> state = tx.init({"w": jnp.zeros((8, 4))})
    >>> state.mu["w"].shape, state.projectors["w"]  # moments 8 x r, no stored projector
    ((8, 2), ())
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 4))}
    >>> updates, state = tx.update(grads, state)
    >>> updates["w"].shape
    (8, 4)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2024.
  """
  _checks.check_positive_int("rank", rank)
  _checks.check_positive_int("update_proj_gap", update_proj_gap)
  _checks.check_choice("scale_type", scale_type, APOLLO_SCALE_TYPES)
  _checks.check_choice("projection", projection, APOLLO_PROJECTIONS)
  _checks.check_choice("proj_type", proj_type, _plans.ONE_SIDED_PROJ_TYPES)
  _fira.check_hyperparameters(scale=scale, norm_growth_limit=norm_growth_limit, b1=b1, b2=b2,
                              eps=eps)
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"`seed` must be an integer, got {seed!r}.")

  def plans_for(tree, treedef, leaves):
    return [_plans.make_plan(tuple(x.shape), spec, rank=rank, proj_type=proj_type)
            for x, spec in zip(leaves, _leaf_specs(dimension_numbers, tree, treedef, leaves))]

  def init_fn(params):
    wrappers, treedef = _tree.flatten_arrays(params)
    leaves = [_tree.unwrap(w) for w in wrappers]
    projectors, mu, nu, norms = [], [], [], []
    for p, plan in zip(leaves, plans_for(params, treedef, leaves)):
      if plan.num_factors:
        like = plan.init_coefficients(p, p.dtype)
        projectors.append(plan.init_factors(p, p.dtype) if projection == "svd" else ())
        norms.append(jnp.zeros(plan.batch_shape, jnp.float32))
      else:
        like = p
        projectors.append(())
        norms.append(())
      mu.append(jnp.zeros_like(like, dtype=mu_dtype or like.dtype))
      nu.append(jnp.zeros_like(like))
    return ApolloState(count=jnp.zeros([], jnp.int32),
                       projectors=treedef.unflatten(projectors), mu=treedef.unflatten(mu),
                       nu=treedef.unflatten(nu), scaled_norm=treedef.unflatten(norms))

  def update_fn(updates, state, params=None):
    del params
    wrappers, treedef = _tree.flatten_arrays(updates)
    grads = [_tree.unwrap(w) for w in wrappers]
    plans = plans_for(updates, treedef, grads)
    count = state.count
    new_count = optax.safe_int32_increment(count)
    s = _fira.step_size(new_count, b1, b2)
    refresh = count % update_proj_gap == 0

    def update_leaf(g, plan, index, factors, mu, nu, previous_norm):
      if not plan.num_factors:
        direction, mu, nu = _fira.adam_moments(g, mu, nu, b1=b1, b2=b2, eps=eps)
        return (s * direction).astype(g.dtype), factors, mu, nu, previous_norm
      if projection == "svd":
        factors = jax.lax.cond(
            refresh,
            lambda: _plans.align_signs(plan.compute_factors(g, factors[0].dtype), factors),
            lambda: tuple(factors))
        basis = factors
      else:
        (shape,) = plan.factor_shapes()
        basis = (random_projection(shape, seed=seed, index=index,
                                   refresh=count // update_proj_gap),)
      coefficients = plan.project(g, basis)
      direction, mu, nu = _fira.adam_moments(coefficients, mu, nu, b1=b1, b2=b2, eps=eps)
      ratio = _fira.norm_ratio(plan, direction, coefficients, g,
                               per_channel=scale_type == "channel")
      scaled, norm = _fira.limit_norm_growth(plan, g.astype(jnp.float32) * ratio,
                                             previous_norm, count == 0, norm_growth_limit)
      return (s * scale * scaled).astype(g.dtype), factors, mu, nu, norm

    stored = [treedef.flatten_up_to(tree) for tree in
              (state.projectors, state.mu, state.nu, state.scaled_norm)]
    outputs = [update_leaf(g, plan, i, *rest)
               for i, (g, plan, *rest) in enumerate(zip(grads, plans, *stored))]
    new_updates = [_tree.rewrap(w, out[0]) for w, out in zip(wrappers, outputs)]
    fields = [treedef.unflatten([out[j] for out in outputs]) for j in range(1, 5)]
    return treedef.unflatten(new_updates), ApolloState(new_count, *fields)

  return optax.GradientTransformation(init_fn, update_fn)


def apollo(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 256,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    scale_type: str = "channel",
    projection: str = "random",
    norm_growth_limit: Optional[float] = _fira.DEFAULT_NORM_GROWTH_LIMIT,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: _alias.MaskOrFn = None,
    mask: _alias.MaskOrFn = None,
    proj_type: str = "std",
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""APOLLO-AdamW: the gradient scaled by Adam's norm ratios on a low-rank projection.

  :func:`scale_by_apollo` on the leaves selected by ``mask`` (default: every leaf with
  ndim >= 2), plain Adam on the others, then decoupled weight decay on the full-size
  parameters and the learning rate: the optax counterpart of the authors' ``APOLLOAdamW``
  (which decays the weights after the step instead of before it, a difference of order
  ``lr^2 * weight_decay`` per step). With the default random projection the state per
  ``m x n`` matrix is Adam's two ``r x max(m, n)`` moments and one scalar.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r`` (the authors use 256 for their LLaMA runs).
    update_proj_gap: Steps between refreshes of the projection.
    scale: Multiplies the projected leaves' updates; the authors' ``scale`` is its square.
    scale_type: ``"channel"`` (one factor per row or column) or ``"tensor"``.
    projection: ``"random"`` (not stored) or ``"svd"``.
    norm_growth_limit: Fira's :math:`\gamma` (>= 1); ``None`` disables the limiter.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon (the authors' default).
    mu_dtype: dtype of Adam's first moment (``None``: the update's dtype).
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay (bool pytree or callable); ``None`` decays all.
    mask: Which leaves get APOLLO (bool pytree or callable of the params); the others get
      plain Adam. ``None`` selects every leaf with ndim >= 2.
    proj_type: Which side is projected; see :func:`galore_projection`.
    dimension_numbers: Which axes of each leaf form a matrix; see :func:`scale_by_apollo`.
    seed: Seed of the random projections.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams``, pass ``rank``,
    ``update_proj_gap`` and ``seed`` as ``static_args``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    >>> tx = ng.apollo(1e-2, rank=4, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.eye(16, 8), "b": jnp.ones((8,))}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].shape
    (16, 8)

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2024.
  """
  core = scale_by_apollo(
      rank=rank, update_proj_gap=update_proj_gap, scale=scale, scale_type=scale_type,
      projection=projection, norm_growth_limit=norm_growth_limit, b1=b1, b2=b2, eps=eps,
      mu_dtype=mu_dtype, proj_type=proj_type, dimension_numbers=dimension_numbers, seed=seed)
  return _alias._assemble(core, dict(  # pylint: disable=protected-access
      learning_rate=learning_rate, mask=mask, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype,
      weight_decay=weight_decay, weight_decay_mask=weight_decay_mask))


def apollo_mini(
    learning_rate: optax.ScalarOrSchedule,
    *,
    update_proj_gap: int = 200,
    scale: float = APOLLO_MINI_SCALE,
    norm_growth_limit: Optional[float] = _fira.DEFAULT_NORM_GROWTH_LIMIT,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: _alias.MaskOrFn = None,
    mask: _alias.MaskOrFn = None,
    dimension_numbers: Any = None,
    seed: int = 0,
) -> optax.GradientTransformation:
  r"""APOLLO-Mini: :func:`apollo` with a rank-1 random projection and one factor per matrix.

  The state per ``m x n`` matrix is two vectors of ``max(m, n)`` entries and one scalar:
  SGD-like memory.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    update_proj_gap: Steps between refreshes of the projection.
    scale: Multiplies the projected leaves' updates; default ``sqrt(128)``, the authors'
      setting (their ``scale=128``, applied as its square root).
    norm_growth_limit: Fira's :math:`\gamma` (>= 1); ``None`` disables the limiter.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    mu_dtype: dtype of Adam's first moment.
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay; ``None`` decays all.
    mask: Which leaves get APOLLO-Mini; ``None`` selects every leaf with ndim >= 2.
    dimension_numbers: Which axes of each leaf form a matrix; see :func:`scale_by_apollo`.
    seed: Seed of the random projections.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams``, pass
    ``update_proj_gap`` and ``seed`` as ``static_args``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> tx = ng.apollo_mini(1e-2)
    >>> state = tx.init({"w": jnp.zeros((512, 128))})
    >>> ng.optimizer_state_bytes(state)["inner_state"]  # 2 x 512 float32 moments
    4096

  References:
    Zhu et al., `APOLLO: SGD-like Memory, AdamW-level Performance
    <https://arxiv.org/abs/2412.05270>`_, 2024.
  """
  return apollo(learning_rate, rank=1, update_proj_gap=update_proj_gap, scale=scale,
                scale_type="tensor", projection="random", norm_growth_limit=norm_growth_limit,
                b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype, weight_decay=weight_decay,
                weight_decay_mask=weight_decay_mask, mask=mask,
                dimension_numbers=dimension_numbers, seed=seed)
