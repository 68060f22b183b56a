"""GaLore's gradient projection as a combinator around an inner optax transformation."""

from typing import Any, Callable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from ngalore_jax import _adam8bit
from ngalore_jax import _checks
from ngalore_jax import _kronecker
from ngalore_jax import _plans
from ngalore_jax import _tree
from ngalore_jax import _woodbury
from ngalore_jax._woodbury import WoodburyState

REFRESH_POLICIES = ("keep", "reset", "rotate")
SVD_METHODS = ("exact", "randomized")
# Measured (benchmarks.convergence): on the d256 setting (4 layers, 1,000 steps) "keep" beat
# "rotate" in 6 of 6 paired runs (GaLore and Natural GaLore at the library's other defaults, 3
# seeds each, by 0.024 nats on average); on the smaller first study "rotate" had been marginally
# ahead (4 of 5, 0.008). "keep" is also what galore-torch and the Natural GaLore code do.
DEFAULT_REFRESH_POLICY = "keep"


class GaLoreProjectionState(NamedTuple):
  """State of :func:`galore_projection`.

  Attributes:
    count: Number of updates so far; projectors are refreshed when it is a multiple of
      ``update_proj_gap`` (shifted per leaf when refreshes are staggered).
    projectors: Per leaf, a tuple of orthonormal factors: one ``[..., d, r]`` matrix for a
      matrix projected on one side, two (``[..., m, r]`` and ``[..., n, r]``) for one
      projected on both (``proj_type="full"``), one ``[d_i, r_i]`` per projected mode for a
      Tucker-projected tensor, empty for a leaf passed through unprojected.
    inner_states: Per leaf, the inner transformation's state, initialised on the low-rank
      coefficients (so its moments are low-rank).
  """
  count: chex.Array
  projectors: Any
  inner_states: Any


DimensionNumbers = Union[None, _plans.MatrixAxes, str, Any, Callable[[Any], Any]]


class _ParamsUnavailable:
  """Stands in for ``params`` inside the projection, where only coefficients exist.

  Any use raises a ``ValueError`` that says where weight decay and other parameter-dependent
  transforms belong, instead of silently computing with the wrong shapes (optax.contrib.galore
  hands its inner optimizer ``None``).
  """

  def __init__(self, shape):
    self._shape = shape

  def _fail(self, *args, **kwargs):
    raise ValueError(
        "galore_projection: the inner transformation used `params`, but inside the projection "
        f"it only sees low-rank coefficients (here of shape {self._shape}), not the weights. "
        "Apply parameter-dependent transforms such as optax.add_decayed_weights outside, in "
        "the full space: optax.chain(ng.galore_projection(inner, ...), "
        "optax.add_decayed_weights(wd), optax.scale_by_learning_rate(lr)).")

  __array__ = __jax_array__ = __add__ = __radd__ = __sub__ = __rsub__ = _fail
  __mul__ = __rmul__ = __truediv__ = __rtruediv__ = __neg__ = __pow__ = __matmul__ = _fail
  __rmatmul__ = __abs__ = __float__ = __bool__ = __getitem__ = _fail

  def __getattr__(self, name):
    if name.startswith("__"):
      raise AttributeError(name)
    self._fail()


def galore_projection(
    inner: optax.GradientTransformation,
    *,
    rank: int,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    proj_type: str = "std",
    refresh_policy: str = DEFAULT_REFRESH_POLICY,
    svd_method: str = "exact",
    oversampling: int = 8,
    power_iterations: int = 2,
    stagger_refresh: bool = False,
    dimension_numbers: DimensionNumbers = None,
    projector_dtype: Optional[Any] = None,
    seed: int = 0,
    combine: Optional[Callable[..., Any]] = None,
) -> optax.GradientTransformation:
  r"""Runs ``inner`` on low-rank projections of the gradients (GaLore).

  For each matrix leaf ``G`` (``m x n``), every ``update_proj_gap`` steps (counting from 0) a
  rank-``r`` orthonormal basis ``P`` of its dominant singular subspace is computed, then

  .. math::
    C = P^\top G \;(\text{or } G P), \qquad
    \Delta = \text{scale} \cdot P\, \text{inner}(C) \;(\text{or } \text{inner}(C) P^\top).

  ``inner``'s ``init`` sees the low-rank coefficient shapes, so its state (e.g. Adam's moments)
  is low-rank: this is where GaLore saves memory. ``optax.chain(project, inner, project_back)``
  cannot do this, because ``chain`` would initialise ``inner`` on the full-size parameters.

  ``inner`` runs on each leaf separately (its state is kept per leaf), which lets each leaf's
  state be reset or rotated when its projector changes. Transforms that need the whole tree
  (``clip_by_global_norm``) belong outside the projection; transforms that need the weights
  (``add_decayed_weights``) too: inside they raise a ``ValueError`` saying so.

  Which leaves are projected:

  - 2-D leaves: as matrices. ``proj_type="std"`` (galore-torch's default) keeps the singular
    vectors of the smaller side, so coefficients are ``r x max(m, n)``; ``"reverse_std"`` the
    other side (optax.contrib.galore's choice); ``"left"``/``"right"`` force a side.
    ``"full"`` projects on both sides with the top-``r`` left and right singular vectors
    ``U``, ``V`` of one SVD: coefficients :math:`C = U^\top G V` are ``r x r`` and
    :math:`\Delta = \text{scale} \cdot U\, \text{inner}(C)\, V^\top` (galore-torch's
    ``proj_type="full"``; what the Natural GaLore authors' Tucker projection does to a
    matrix). At a refresh the coefficients of the decomposed gradient itself are
    ``diag(s)`` up to rounding: an inner transformation that normalises entry by entry from
    empty state (Adam at step 0, or after a ``"reset"``) turns that rounding into
    :math:`\pm 1` entries unless its ``eps`` exceeds it, as in galore-torch.
  - Leaves with more than 2 dims: a Tucker/HOSVD factor per mode (Natural GaLore, Step 1), unless
    ``dimension_numbers`` says which axes form the matrix (:class:`MatrixAxes`; the remaining
    axes are batch axes, e.g. stacked ``[layers, in, out]`` kernels with ``MatrixAxes(1, 2)``;
    under ``proj_type="full"`` each of those matrices is projected on both sides). ``proj_type``
    does not change this default: Tucker is already two-sided.
  - 0-D/1-D leaves, and leaves whose dimension number is ``None``: passed to ``inner``
    unprojected.

  The rank is clipped to ``min(m, n)`` (per mode for Tucker). Each refreshed basis vector is
  sign-aligned with the one it replaces, so that the run does not depend on the SVD backend's
  sign convention. Projectors are computed in float32
  (exact thin SVD, or a randomized range finder for large matrices) and stored in
  ``projector_dtype`` (default: the gradient's dtype). Projections run in float32; updates
  have the gradient's dtype.

  Args:
    inner: The transformation applied to the coefficients, e.g.
      ``optax.chain(ng.woodbury_precondition(), optax.scale_by_adam())``.
    rank: Rank ``r`` of the projection (>= 1).
    update_proj_gap: Steps between projector refreshes ``T`` (>= 1).
    scale: GaLore's ``alpha``, multiplying the projected-back update (finite, > 0).
    proj_type: ``"std"``, ``"reverse_std"``, ``"left"``, ``"right"`` or ``"full"``
      (two-sided; it applies to matrices, a leaf marked ``"tucker"`` in
      ``dimension_numbers`` is a ``ValueError``).
    refresh_policy: What happens to ``inner``'s state when a leaf's projector is refreshed:
      ``"keep"`` it as it is (default; galore-torch and the Natural GaLore code do this),
      ``"rotate"`` it into the new basis with ``R = P_new^T P_old`` (first moments and gradient
      histories linearly, Adam's second moment with ``R * R``, the diagonal of
      ``R diag(v) R^T``; with ``proj_type="full"`` on both sides, ``R_l C R_r^T`` with
      ``R_l = U_new^T U_old``, ``R_r = V_new^T V_old``, and ``(R_l * R_l) v (R_r * R_r)^T``),
      or ``"reset"`` it to ``inner.init``. ``"rotate"`` knows the states of
      optax's Adam, AMSGrad, AdaBelief, Lion, RMSProp, RSS, momentum (``trace``),
      :class:`WoodburyState`, :class:`KroneckerState` and :class:`ScaleByAdam8bitState`; any
      other array state raises a ``ValueError`` (choose ``"keep"`` or ``"reset"`` for those
      inners). The default was measured (``keep`` ahead of ``rotate`` in 6 of 6 paired runs of
      ``benchmarks.convergence --setting d256``).
    svd_method: ``"exact"`` (thin SVD) or ``"randomized"`` (range finder with subspace
      iteration; far cheaper when ``r << min(m, n)``).
    oversampling: Extra random directions for ``"randomized"`` (>= 0).
    power_iterations: Subspace iterations for ``"randomized"`` (>= 0).
    stagger_refresh: Spread the refreshes of the projected leaves evenly over the
      ``update_proj_gap`` steps (all leaves still get a projector at step 0), so that not every
      SVD lands on the same step.
    dimension_numbers: ``None`` (default rules above), a :class:`MatrixAxes` applied to every leaf
      with ndim >= 2, or a pytree (or a callable of the params returning one) with a
      :class:`MatrixAxes`, ``"tucker"`` or ``None`` per leaf.
    projector_dtype: Floating-point dtype to store projectors in; ``None`` uses the gradient's
      dtype.
    seed: Seed of the random test matrices of ``"randomized"``.
    combine: Replaces the projection back, for optimizers that also use the gradient outside
      the subspace (:func:`ngalore_jax.fira`). Called for each projected leaf as
      ``combine(grad, coefficients, low_rank_update, inner_state, plan, factors)`` (``plan``:
      the leaf's geometry, ``factors``: its current projectors), it returns the leaf's update
      and ``inner_state``; ``scale`` is not applied to it. ``None``: ``scale`` times the
      projected-back ``low_rank_update``.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> tx = ng.galore_projection(optax.scale_by_adam(), rank=2, update_proj_gap=10)
    >>> params = {"w": jnp.zeros((8, 4)), "b": jnp.zeros((4,))}
    >>> state = tx.init(params)
    >>> state.inner_states["w"].mu.shape  # Adam's moments are low-rank: 8 x r
    (8, 2)
    >>> grads = {"w": jax.random.normal(jax.random.key(0), (8, 4)), "b": jnp.ones((4,))}
    >>> updates, state = tx.update(grads, state)
    >>> updates["w"].shape
    (8, 4)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.

    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning
    <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  _checks.check_positive_int("rank", rank)
  _checks.check_positive_int("update_proj_gap", update_proj_gap)
  # A negative scale would silently turn descent into ascent.
  _checks.check_positive("scale", scale)
  _checks.check_choice("proj_type", proj_type, _plans.PROJ_TYPES)
  _checks.check_choice("refresh_policy", refresh_policy, REFRESH_POLICIES)
  _checks.check_choice("svd_method", svd_method, SVD_METHODS)
  if isinstance(oversampling, bool) or not isinstance(oversampling, int) or oversampling < 0:
    raise ValueError(f"`oversampling` must be an integer >= 0, got {oversampling!r}.")
  if (isinstance(power_iterations, bool) or not isinstance(power_iterations, int)
      or power_iterations < 0):
    raise ValueError(f"`power_iterations` must be an integer >= 0, got {power_iterations!r}.")
  if projector_dtype is not None:
    _checks.check_float_dtype("projector_dtype", projector_dtype)

  def leaf_specs(tree, treedef, leaves):
    """The dimension-number entry of each leaf, as a list in flattening order."""
    if dimension_numbers is None:
      return [_plans.MatrixAxes() if x.ndim == 2 else _plans.TUCKER if x.ndim > 2 else None
              for x in leaves]
    if _is_matrix_axes(dimension_numbers):
      return [dimension_numbers if x.ndim >= 2 else None for x in leaves]
    dims = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
    specs = [_spec_entry(d) for d in treedef.flatten_up_to(dims)]
    if proj_type == "full":
      for x, spec in zip(leaves, specs):
        _plans.check_two_sided(tuple(x.shape), spec)
    return specs

  def plans_for(tree, treedef, leaves):
    return [_plans.make_plan(tuple(x.shape), spec, rank=rank, proj_type=proj_type)
            for x, spec in zip(leaves, leaf_specs(tree, treedef, leaves))]

  def refresh_offsets(plans):
    """Per leaf, the shift of its refresh schedule (0 unless staggered)."""
    projected = [i for i, p in enumerate(plans) if p.num_factors]
    offsets = [0] * len(plans)
    if stagger_refresh:
      for j, i in enumerate(projected):
        offsets[i] = (j * update_proj_gap) // max(len(projected), 1)
    return offsets

  # Leaves are taken up to array wrappers such as flax.nnx.Variable (see _tree.flatten_arrays):
  # each leaf's state container replaces the wrapper instead of becoming its value.
  def init_fn(params):
    wrappers, treedef = _tree.flatten_arrays(params)
    leaves = [_tree.unwrap(w) for w in wrappers]
    projectors, inner_states = [], []
    for p, plan in zip(leaves, plans_for(params, treedef, leaves)):
      if not plan.num_factors:
        projectors.append(())
        inner_states.append(inner.init(p))
        continue
      projectors.append(plan.init_factors(p, projector_dtype or p.dtype))
      inner_states.append(inner.init(plan.init_coefficients(p, p.dtype)))
    return GaLoreProjectionState(count=jnp.zeros([], jnp.int32),
                                 projectors=treedef.unflatten(projectors),
                                 inner_states=treedef.unflatten(inner_states))

  def update_fn(updates, state, params=None):
    wrappers, treedef = _tree.flatten_arrays(updates)
    grads = [_tree.unwrap(w) for w in wrappers]
    plans = plans_for(updates, treedef, grads)
    offsets = refresh_offsets(plans)
    all_factors = [_checked_factors(f, plan, i) for i, (f, plan) in
                   enumerate(zip(treedef.flatten_up_to(state.projectors), plans))]
    all_inner_states = treedef.flatten_up_to(state.inner_states)
    if params is None:
      all_params = [None] * len(grads)
    else:
      all_params = [_tree.unwrap(p) for p in treedef.flatten_up_to(params)]
    count = state.count
    base_key = jax.random.key(seed)

    def update_leaf(g, factors, inner_state, plan, offset, index, p):
      if not plan.num_factors:
        new_g, new_inner = inner.update(g, inner_state, p)
        return new_g, factors, new_inner
      refresh = (count == 0) | ((count + offset) % update_proj_gap == 0)
      key = jax.random.fold_in(jax.random.fold_in(base_key, count), index)
      svd_kwargs = dict(method=svd_method, key=key, oversampling=oversampling,
                        power_iterations=power_iterations)
      dtype = factors[0].dtype
      def refreshed():
        new_factors = _plans.align_signs(plan.compute_factors(g, dtype, **svd_kwargs), factors)
        return new_factors, _refreshed_inner_state(refresh_policy, inner, plan, factors,
                                                   new_factors, inner_state, g.dtype)

      # The policy's work (a rotation reads and rewrites the whole inner state) runs inside
      # the refresh branch: an ordinary step passes the state through untouched.
      if refresh_policy == "keep":  # no state through the cond: nothing to copy
        new_factors = jax.lax.cond(refresh, lambda: refreshed()[0], lambda: factors)
      else:
        new_factors, inner_state = jax.lax.cond(refresh, refreshed,
                                                lambda: (factors, inner_state))
      coefficients = plan.project(g, new_factors)
      low_rank_update, new_inner = inner.update(
          coefficients, inner_state, _ParamsUnavailable(coefficients.shape))
      if combine is None:
        full = plan.project_back(low_rank_update, new_factors, g) * scale
      else:
        full, new_inner = combine(g, coefficients, low_rank_update, new_inner, plan, new_factors)
      return full.astype(g.dtype), new_factors, new_inner

    outputs = [update_leaf(*args) for args in zip(
        grads, all_factors, all_inner_states, plans, offsets, range(len(grads)), all_params)]
    new_updates = [_tree.rewrap(w, u) for w, (u, _, _) in zip(wrappers, outputs)]
    return treedef.unflatten(new_updates), GaLoreProjectionState(
        count=optax.safe_int32_increment(count),
        projectors=treedef.unflatten([f for _, f, _ in outputs]),
        inner_states=treedef.unflatten([s for _, _, s in outputs]))

  return optax.GradientTransformation(init_fn, update_fn)


def _is_matrix_axes(x) -> bool:
  return hasattr(x, "reduction_axis") and hasattr(x, "output_axis")


def _spec_entry(entry):
  """One leaf's dimension number, taken out of a wrapper (``jax.tree.map`` over an nnx State
  puts the callable's ``MatrixAxes``/``"tucker"``/``None`` inside each ``nnx.Variable``)."""
  if entry is None or isinstance(entry, str) or _is_matrix_axes(entry):
    return entry
  found = jax.tree.leaves(entry, is_leaf=lambda x: isinstance(x, str) or _is_matrix_axes(x))
  if not found:
    return None
  if len(found) == 1 and (isinstance(found[0], str) or _is_matrix_axes(found[0])):
    return found[0]
  raise ValueError("`dimension_numbers`: expected a MatrixAxes, 'tucker' or None per leaf, "
                   f"got {entry!r}.")


def _checked_factors(factors, plan, index):
  """A leaf's projector factors as stored; a clear error if a conversion changed the tuple."""
  if isinstance(factors, tuple) and len(factors) == plan.num_factors:
    return factors
  raise ValueError(
      f"galore_projection: the state holds {type(factors).__name__} {factors!r:.80} as the "
      f"projector factors of leaf {index}, expected a tuple of {plan.num_factors} arrays. The "
      "optimizer state went through a conversion that changed its containers; pass "
      "tx.update the state exactly as tx.init (or the previous update) returned it.")


# How each known inner state moves to a new basis: first moments (and gradient histories) are
# linear in the coefficients; elementwise second moments transform by R * R (the diagonal of
# R diag(v) R^T), which keeps them non-negative. A rule is either {field: kind} or a function
# rule(state, plan, rotation) -> state, for states that need more than plan.rotate per field.
_ROTATION_RULES = {
    optax.ScaleByAdamState: {"mu": "linear", "nu": "quadratic"},
    optax.ScaleByAmsgradState: {"mu": "linear", "nu": "quadratic", "nu_max": "quadratic"},
    optax.ScaleByBeliefState: {"mu": "linear", "nu": "quadratic"},
    optax.ScaleByRStdDevState: {"mu": "linear", "nu": "quadratic"},
    optax.ScaleByLionState: {"mu": "linear"},
    optax.ScaleByRmsState: {"nu": "quadratic"},
    optax.ScaleByRssState: {"sum_of_squares": "quadratic"},
    optax.TraceState: {"trace": "linear"},
    WoodburyState: _woodbury.rotate_state,  # linear; an int8 history is requantised
    # mu linear, nu with R * R, as optax's Adam; 8-bit moments are dequantised and requantised
    _adam8bit.ScaleByAdam8bitState: _adam8bit.rotate_state,
    _kronecker.KroneckerState: _kronecker.rotate_state,  # L -> R L R^T on the rank side
}


def _refreshed_inner_state(policy, inner, plan, old_factors, new_factors, inner_state, dtype):
  """``inner_state`` adjusted by ``policy`` for a projector change (the refresh branch only).

  The result has the dtypes of ``inner_state``: both branches of the refresh's ``lax.cond``
  must agree.
  """
  if policy == "keep":
    return inner_state
  if policy == "reset":
    fresh = inner.init(jnp.zeros(plan.coefficient_shape(), dtype))
    return jax.tree.map(lambda f, s: jnp.asarray(f, s.dtype), fresh, inner_state)
  rotation = plan.rotation(new_factors, old_factors)

  def rotate_node(node):
    rules = _ROTATION_RULES.get(type(node))
    if callable(rules):
      return rules(node, plan, rotation)
    if rules is not None:
      return node._replace(**{
          field: plan.rotate(getattr(node, field), rotation, squared=kind == "quadratic")
          for field, kind in rules.items()})
    if hasattr(node, "shape") and node.ndim >= 1 and jnp.issubdtype(node.dtype, jnp.floating):
      raise ValueError(
          f"refresh_policy='rotate' does not know how to rotate an inner state of shape "
          f"{node.shape} (coefficients {plan.coefficient_shape()}); it knows "
          f"{', '.join(sorted(t.__name__ for t in _ROTATION_RULES))}. "
          "Use refresh_policy='keep' or 'reset' with this inner transformation.")
    return node

  is_known = lambda x: type(x) in _ROTATION_RULES
  rotated = jax.tree.map(rotate_node, inner_state, is_leaf=is_known)
  return jax.tree.map(lambda r, s: jnp.asarray(r, s.dtype), rotated, inner_state)
