"""Ready-made optimizers: GaLore-Adam and Natural GaLore, with AdamW on the other leaves."""

from typing import Any, Callable, Optional, Union

import jax
import numpy as np
import optax

from ngalore_jax import _projection
from ngalore_jax import _woodbury

MaskOrFn = Union[None, Any, Callable[[Any], Any]]

DEFAULT_HISTORY_SIZE = 10
DEFAULT_DAMPING = 1e-3

# The keyword arguments of `galore_projection` that the aliases pass on unchanged. Each alias
# still spells them out in its signature (optax.inject_hyperparams reads signatures), and
# forwards them all through `_projected`: a new projection option is a name here and a
# parameter in each signature.
PROJECTION_OPTIONS = ("rank", "update_proj_gap", "scale", "proj_type", "refresh_policy",
                      "svd_method", "oversampling", "power_iterations", "stagger_refresh",
                      "dimension_numbers", "projector_dtype", "seed")


def _projected(inner: optax.GradientTransformation,
               arguments: dict[str, Any]) -> optax.GradientTransformation:
  """``galore_projection(inner, ...)`` with the :data:`PROJECTION_OPTIONS` of ``arguments``."""
  return _projection.galore_projection(
      inner, **{name: arguments[name] for name in PROJECTION_OPTIONS})


def _float32_value(value: Any) -> Any:
  """A Python float rounded to the nearest float32 value (anything else unchanged).

  optax's Adam computes ``1 - b`` in Python (float64) when a decay rate ``b`` is a Python float,
  but in float32 when ``optax.inject_hyperparams`` hands it over as an array. For ``b2 = 0.999``
  the two differ by 1.3e-5 relative (float32's rounding of 0.999, times ``1 / (1 - b2)``), and so
  did the updates. Rounded first, both paths compute the same numbers.
  """
  if isinstance(value, float):
    return float(np.float32(value))
  return value


def _adam(arguments: dict[str, Any]) -> optax.GradientTransformation:
  """``scale_by_adam`` with the alias's ``b1``, ``b2``, ``eps`` and ``mu_dtype``."""
  return optax.scale_by_adam(b1=_float32_value(arguments["b1"]),
                             b2=_float32_value(arguments["b2"]), eps=arguments["eps"],
                             mu_dtype=arguments["mu_dtype"])


def _default_mask(params):
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def _assemble(projection: optax.GradientTransformation,
              arguments: dict[str, Any]) -> optax.GradientTransformation:
  """``chain(partition(projected -> projection, rest -> Adam), decay, lr)``."""
  mask = _default_mask if arguments["mask"] is None else arguments["mask"]

  def labels(params):
    resolved = mask(params) if callable(mask) else mask
    return jax.tree.map(lambda projected: "galore" if projected else "adam", resolved)

  core = optax.partition({"galore": projection, "adam": _adam(arguments)}, labels)
  return optax.chain(
      core,
      optax.add_decayed_weights(arguments["weight_decay"], arguments["weight_decay_mask"]),
      optax.scale_by_learning_rate(arguments["learning_rate"]),
  )


def galore(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    mask: MaskOrFn = None,
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
  r"""GaLore with Adam in the subspace, decoupled weight decay in the full space.

  ``galore_projection(scale_by_adam)`` on the leaves selected by ``mask`` (default: every leaf
  with ndim >= 2), plain Adam on the others, then ``add_decayed_weights`` on the full-size
  parameters and the learning rate: the optax counterpart of galore-torch's ``GaLoreAdamW``.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    mu_dtype: dtype of Adam's first moment (``None``: the update's dtype).
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay (bool pytree or callable, as ``optax.masked`` takes);
      ``None`` decays all.
    mask: Which leaves are projected (bool pytree or callable of the params); the others get
      plain Adam. ``None`` projects every leaf with ndim >= 2.
    proj_type: Which side holds the projector; see :func:`galore_projection`.
    refresh_policy: ``"keep"``, ``"reset"`` or ``"rotate"`` the inner state on a refresh.
    svd_method: ``"exact"`` or ``"randomized"``.
    oversampling: Extra random directions of the randomized SVD.
    power_iterations: Subspace iterations of the randomized SVD.
    stagger_refresh: Spread the leaves' refreshes over the gap.
    dimension_numbers: Which axes of each leaf form a matrix; see :func:`galore_projection`.
    projector_dtype: dtype of the stored projectors (``None``: the gradient's).
    seed: Seed of the randomized SVD.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams``, pass the
    shape-determining integers (``rank``, ``update_proj_gap``, ``oversampling``,
    ``power_iterations``, ``seed``) as ``static_args``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    >>> tx = ng.galore(1e-2, rank=4, update_proj_gap=50)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.eye(16, 8), "b": jnp.ones((8,))}
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> params["w"].shape
    (16, 8)

  References:
    Zhao et al., `GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection
    <https://arxiv.org/abs/2403.03507>`_, 2024.
  """
  arguments = dict(locals())
  return _assemble(_projected(_adam(arguments), arguments), arguments)


def natural_galore(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 0.25,
    history_size: int = DEFAULT_HISTORY_SIZE,
    damping: float = DEFAULT_DAMPING,
    exponent: float = -1.0,
    damping_mode: str = "absolute",
    history_dtype: Optional[Any] = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    mask: MaskOrFn = None,
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
  r"""Natural GaLore: a natural-gradient step, then Adam, in GaLore's subspace.

  On the projected leaves: ``galore_projection(chain(woodbury_precondition, scale_by_adam))``;
  the low-rank coefficients are preconditioned by the inverse empirical Fisher of their last
  ``history_size`` values, :math:`(\lambda I + H H^\top)^{-1} g`, before Adam. Plain Adam on the
  other leaves, decoupled weight decay in the full space, then the learning rate.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha``.
    history_size: Gradients kept per projected leaf (memory: ``history_size`` x the coefficients).
    damping: :math:`\lambda` of the Fisher estimate.
    exponent: Power of the damped Fisher: ``-1`` (the paper) or e.g. ``-0.5``.
    damping_mode: ``"absolute"`` (the paper) or ``"relative"`` to the history's top eigenvalue.
    history_dtype: dtype of the stored history; ``None`` keeps the coefficients' dtype.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    mu_dtype: dtype of Adam's first moment.
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay; ``None`` decays all.
    mask: Which leaves are projected; ``None`` projects every leaf with ndim >= 2.
    proj_type: Which side holds the projector; see :func:`galore_projection`.
    refresh_policy: ``"keep"``, ``"reset"`` or ``"rotate"`` the inner state on a refresh.
    svd_method: ``"exact"`` or ``"randomized"``.
    oversampling: Extra random directions of the randomized SVD.
    power_iterations: Subspace iterations of the randomized SVD.
    stagger_refresh: Spread the leaves' refreshes over the gap.
    dimension_numbers: Which axes of each leaf form a matrix; see :func:`galore_projection`.
    projector_dtype: dtype of the stored projectors (``None``: the gradient's).
    seed: Seed of the randomized SVD.

  Returns:
    An ``optax.GradientTransformation``. Under ``optax.inject_hyperparams``, pass ``rank``,
    ``update_proj_gap``, ``history_size``, ``oversampling``, ``power_iterations`` and ``seed``
    as ``static_args``.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> params = {"w": jnp.ones((16, 8)), "b": jnp.zeros((8,))}
    >>> tx = ng.natural_galore(1e-2, rank=4, history_size=5, damping=1e-3)
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.eye(16, 8), "b": jnp.ones((8,))}
    >>> updates, state = tx.update(grads, state, params)
    >>> bool(jnp.all(jnp.isfinite(updates["w"])))
    True

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning
    <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  arguments = dict(locals())
  inner = optax.chain(
      _woodbury.woodbury_precondition(history_size=history_size, damping=damping,
                                      exponent=exponent, damping_mode=damping_mode,
                                      history_dtype=history_dtype),
      _adam(arguments),
  )
  return _assemble(_projected(inner, arguments), arguments)
