"""Ready-made optimizers: GaLore-Adam and Natural GaLore, with AdamW on the other leaves."""

import types
from typing import Any, Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ngalore_jax import _adam8bit
from ngalore_jax import _checks
from ngalore_jax import _kronecker
from ngalore_jax import _projection
from ngalore_jax import _woodbury

MaskOrFn = Union[None, Any, Callable[[Any], Any]]

# The aliases' defaults, chosen by measurement (benchmarks/README.md, benchmarks.convergence and
# benchmarks.memory); `galore_projection` itself keeps galore-torch's "std".
#
# Projecting onto the larger side ("reverse_std": coefficients r x min(m, n)) gave a lower held-out
# loss than galore-torch's "std" (r x max(m, n)) for GaLore and Natural GaLore, on both
# benchmark settings, and holds less state.
DEFAULT_PROJ_TYPE = "reverse_std"
# Natural GaLore's history: the last 4 projected gradients in int8 (a per-vector absmax scale)
# brings its state to 1.19x GaLore's at LLaMA-1B rank 512 (the paper's float32 history of 10 on
# the smaller side: 4.4x); on the small convergence benchmark it matched a float32 history of 10
# on the same side (3 seeds). It still trails GaLore by about 0.02 nats on both benchmarks.
DEFAULT_HISTORY_SIZE = 4
# A dtype instance, not the callable `jnp.int8`: optax.inject_hyperparams would take a callable
# for a schedule and inject its value.
DEFAULT_HISTORY_DTYPE = jnp.dtype(jnp.int8)
DEFAULT_DAMPING = 1e-3
DEFAULT_KRONECKER_BETA = 0.95
# The curvature estimates `natural_galore` can put before Adam.
PRECONDITIONERS = ("woodbury", "kronecker")

# The setting of the Natural GaLore authors' PyTorch code (github.com/selfsupervised-ai/
# Natural-GaLore, code/natural_galore/: SubSpaceAdamW and GaLoreProjectorTensor, with the
# optimizer built as pytorchrun_main.py builds it). Per entry, what that code does:
OFFICIAL_CODE_SETTINGS = types.MappingProxyType({
    # GaLoreProjectorTensor projects every selected weight with tensorly's Tucker decomposition
    # (ranks [rank] * ndim) and transforms the gradient with the factors transposed. On a 2-D
    # weight the Tucker factors (HOOI from an SVD start, which a matrix does not move) are the
    # top-r left and right singular vectors, so the coefficients are U^T G V, r x r: the
    # two-sided projection. (Tensors with more than 2 dims get one factor per mode under ng's
    # default `dimension_numbers`, a Tucker projection like theirs.)
    "proj_type": "full",
    # SubSpaceAdamW's `natural_history=20` (pytorchrun_main.py's --natural_history default):
    # the last 20 projected gradients, the current one included.
    "history_size": 20,
    # GaLoreProjectorTensor fixes lambda_damping = 1e-3 (not an argument there).
    "damping": 1e-3,
    # Their natural-gradient step is lambda^-1 g - lambda^-2 H (I + H^T H / lambda)^-1 H^T g,
    # i.e. (lambda I + H H^T)^-1 g: the inverse, with an absolute damping. ng computes the same
    # vector in a form that does not cancel in float32.
    "exponent": -1.0,
    "damping_mode": "absolute",
    # SubSpaceAdamW's default eps (pytorchrun_main.py passes only lr and weight_decay). Their
    # Adam adds eps to sqrt(v) before the bias correction, optax to sqrt(v_hat): in optax's
    # terms theirs is eps / sqrt(1 - b2**t), 31.6 eps at the first step, 1.26 eps at step 1000,
    # eps in the long run.
    "eps": 1e-6,
    # Neither Adam's moments nor the gradient history change when the projector is refreshed
    # (the history is never cleared): ng's "keep".
    "refresh_policy": "keep",
    # Their history is kept in the gradients' dtype (float32), not ng's default int8.
    "history_dtype": None,
})
# Not in the preset, because they are ng's defaults already or belong to the run: the
# natural-gradient step comes before Adam (their projector applies it inside `project`, ahead of
# Adam); b1, b2 = 0.9, 0.999; their C4 scripts use rank 128 (60M) to 1024 (1B),
# update_proj_gap 200 and galore_scale 0.25 (ng's defaults), lr 0.01, weight decay 0.01 (60M)
# or 0 (1B), on the attention and MLP Linear weights. Their AdamW decays the weights after the
# step, p <- (1 - lr wd)(p - lr u); optax before it: the difference is O(lr^2 wd) per step.

# The keyword arguments of `galore_projection` that the aliases pass on unchanged. Each alias
# still spells them out in its signature (optax.inject_hyperparams reads signatures), and
# forwards them all through `_projected`: a new projection option is a name here and a
# parameter in each signature. Options of what runs inside the projection (natural_galore's
# `preconditioner`, `kronecker_beta`, the history's) are not projection options: the alias
# builds its inner transformation from them (`_natural_inner`).
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
  """``scale_by_adam`` with the alias's ``b1``, ``b2``, ``eps`` and ``mu_dtype``; with
  ``adam_8bit`` set, :func:`ngalore_jax.scale_by_adam_8bit` (``mu_dtype`` must be unset)."""
  if arguments.get("adam_8bit", False):
    if arguments.get("mu_dtype") is not None:
      raise ValueError("`mu_dtype` sets the dtype of float Adam's first moment; with "
                       f"adam_8bit=True both moments are 8-bit (got mu_dtype="
                       f"{arguments['mu_dtype']!r}). Leave mu_dtype=None.")
    return _adam8bit.scale_by_adam_8bit(b1=_float32_value(arguments["b1"]),
                                        b2=_float32_value(arguments["b2"]), eps=arguments["eps"])
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


def _is_set(value: Any, default: Any) -> bool:
  """Whether an option differs from its default (a traced value counts as unset: it was
  checked when the optimizer was first built with concrete values)."""
  if isinstance(value, jax.core.Tracer):
    return False
  if value is None or default is None:
    return value is not default
  try:
    return bool(np.float32(value) != np.float32(default))
  except (TypeError, ValueError):
    return value != default


def _natural_inner(arguments: dict[str, Any]) -> optax.GradientTransformation:
  """The preconditioner ``arguments`` name, then Adam: what ``natural_galore`` projects."""
  preconditioner = arguments["preconditioner"]
  _checks.check_choice("preconditioner", preconditioner, PRECONDITIONERS)
  if preconditioner == "kronecker":
    for name, default in (("history_size", DEFAULT_HISTORY_SIZE),
                          ("history_dtype", DEFAULT_HISTORY_DTYPE)):
      if _is_set(arguments[name], default):
        raise ValueError(
            f"`{name}` configures the gradient history of preconditioner='woodbury'; "
            f"preconditioner='kronecker' keeps none (got {name}={arguments[name]!r}). Leave it "
            "at its default, or use `kronecker_beta` for the Kronecker factor's decay.")
    curvature = _kronecker.kronecker_precondition(
        beta=_float32_value(arguments["kronecker_beta"]), damping=arguments["damping"],
        exponent=arguments["exponent"], damping_mode=arguments["damping_mode"])
  else:
    if _is_set(arguments["kronecker_beta"], DEFAULT_KRONECKER_BETA):
      raise ValueError(
          "`kronecker_beta` is the decay of preconditioner='kronecker'; the 'woodbury' "
          f"preconditioner keeps a history instead (got kronecker_beta="
          f"{arguments['kronecker_beta']!r}). Set preconditioner='kronecker' or leave it out.")
    curvature = _woodbury.woodbury_precondition(
        history_size=arguments["history_size"], damping=arguments["damping"],
        exponent=arguments["exponent"], damping_mode=arguments["damping_mode"],
        history_dtype=arguments["history_dtype"])
  return optax.chain(curvature, _adam(arguments))


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
    adam_8bit: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    mask: MaskOrFn = None,
    proj_type: str = DEFAULT_PROJ_TYPE,
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
  parameters and the learning rate: the optax counterpart of galore-torch's ``GaLoreAdamW``
  (equal to it with ``proj_type="std"``; the default side differs because measurement chose
  otherwise, see ``proj_type``).

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha``.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    mu_dtype: dtype of Adam's first moment (``None``: the update's dtype).
    adam_8bit: Keep Adam's moments in 8 bits, on the projected coefficients and on the
      unprojected leaves: :func:`ngalore_jax.scale_by_adam_8bit` (bitsandbytes' ``Adam8bit``
      scheme; blocks of 256, leaves under 4096 elements stay float32) instead of
      ``optax.scale_by_adam``. About a quarter of Adam's state; ``mu_dtype`` must stay
      ``None``.
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay (bool pytree or callable, as ``optax.masked`` takes);
      ``None`` decays all.
    mask: Which leaves are projected (bool pytree or callable of the params); the others get
      plain Adam. ``None`` projects every leaf with ndim >= 2.
    proj_type: Which side holds the projector (``"full"``: both); see
      :func:`galore_projection`. The default ``"reverse_std"`` projects onto the larger side
      (coefficients ``r x min(m, n)``): lower held-out loss and less state than galore-torch's
      ``"std"`` in this library's benchmarks; pass ``"std"`` for galore-torch's behaviour.
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
    history_dtype: Optional[Any] = DEFAULT_HISTORY_DTYPE,
    preconditioner: str = "woodbury",
    kronecker_beta: float = DEFAULT_KRONECKER_BETA,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    mu_dtype: Optional[Any] = None,
    adam_8bit: bool = False,
    weight_decay: float = 0.0,
    weight_decay_mask: MaskOrFn = None,
    mask: MaskOrFn = None,
    proj_type: str = DEFAULT_PROJ_TYPE,
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

  **Defaults, by measurement.** The paper's step (exponent ``-1``, damping ``1e-3`` absolute) on
  a history of the last **4** gradients stored in **int8**, projected onto the larger side
  (``proj_type="reverse_std"``): 1.19x ``galore()``'s optimizer state at LLaMA-1B rank 512
  (the paper's float32 history of 10 on the smaller side: 4.4x), at no measured loss against a
  float32 history of 10 on the same side. In this library's benchmarks Natural GaLore at these
  defaults trails ``galore()`` by about 0.02 nats of held-out loss (README, "Benchmarks").
  ``history_size=10, history_dtype=None, proj_type="std"`` is the paper's setting;
  ``OFFICIAL_CODE_SETTINGS`` the authors' code's.

  ``preconditioner="kronecker"`` replaces the history by
  :func:`ngalore_jax.kronecker_precondition`'s exponential moving average of one side's outer
  products, :math:`(\lambda I + \hat L)^{p} C` (memory: one ``r x r`` factor per matrix,
  whatever the history length), with ``beta=kronecker_beta`` and this function's ``damping``,
  ``exponent`` and ``damping_mode``. Their defaults here are the paper's (``-1``, absolute);
  ``kronecker_precondition``'s own are Shampoo's (``-0.5``, relative). The history's options
  (``history_size``, ``history_dtype``) set to anything but their defaults are then a
  ``ValueError``, and so is ``kronecker_beta`` with the Woodbury history.

  :data:`ngalore_jax.OFFICIAL_CODE_SETTINGS` holds the setting of the authors' code
  (two-sided projection, history 20, damping 1e-3, Adam's eps 1e-6, state kept on refresh):
  ``natural_galore(lr, rank=r, **ng.OFFICIAL_CODE_SETTINGS)``.

  Args:
    learning_rate: A float or an ``optax`` schedule.
    rank: Projection rank ``r``.
    update_proj_gap: Steps between projector refreshes.
    scale: GaLore's ``alpha``.
    history_size: Gradients kept per projected leaf, the current one included (memory:
      ``history_size`` x the coefficients). The paper and the authors' code keep 10-20.
    damping: :math:`\lambda` of the Fisher estimate.
    exponent: Power of the damped Fisher: ``-1`` (the paper) or e.g. ``-0.5``.
    damping_mode: ``"absolute"`` (the paper) or ``"relative"`` to the history's top eigenvalue.
    history_dtype: dtype of the stored history: ``jnp.int8`` (the default; quantised on push
      with one absmax scale per gradient, dequantised into the float32 solve), a float dtype,
      or ``None`` to keep the coefficients' dtype (float32 for float32 parameters).
    preconditioner: ``"woodbury"`` (the paper's gradient history) or ``"kronecker"`` (a
      one-sided Kronecker factor; see above).
    kronecker_beta: Decay of the Kronecker factor's moving average (``"kronecker"`` only).
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    mu_dtype: dtype of Adam's first moment.
    adam_8bit: Keep Adam's moments in 8 bits, on the projected coefficients and on the
      unprojected leaves: :func:`ngalore_jax.scale_by_adam_8bit` (bitsandbytes' ``Adam8bit``
      scheme; blocks of 256, leaves under 4096 elements stay float32) instead of
      ``optax.scale_by_adam``. With ``history_dtype=jnp.int8`` (the default) all of Natural
      GaLore's per-coefficient state is then 8-bit. ``mu_dtype`` must stay ``None``.
    weight_decay: Decoupled weight-decay rate, applied in the full space.
    weight_decay_mask: Which leaves decay; ``None`` decays all.
    mask: Which leaves are projected; ``None`` projects every leaf with ndim >= 2.
    proj_type: Which side holds the projector (``"full"``: both); see
      :func:`galore_projection`. The default ``"reverse_std"`` projects onto the larger side
      (coefficients ``r x min(m, n)``): lower held-out loss and less state than galore-torch's
      ``"std"`` in this library's benchmarks; pass ``"std"`` for galore-torch's behaviour.
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
    >>> official = ng.natural_galore(1e-2, rank=4, **ng.OFFICIAL_CODE_SETTINGS)
    >>> official.init(params)[0].inner_states["galore"].inner_state.projectors["w"][1].shape
    (8, 4)
    >>> lean = ng.natural_galore(1e-2, rank=4, preconditioner="kronecker")

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning
    <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  arguments = dict(locals())
  return _assemble(_projected(_natural_inner(arguments), arguments), arguments)
