"""Optimizers as data: one small registered config per optimizer, each with its own ``build``.

Every entry point (pretraining, the benchmarks) names an optimizer and its options the same way:
a frozen dataclass registered under a name (:data:`REGISTRY`). The command line is generated
from the dataclass fields (:func:`train.config.build_parser`), so a new optimizer is one class
here and nothing else: its fields become flags, its ``build`` the optax transformation.

Fields left at ``None`` mean "the library's default" (``ng.natural_galore``'s ``history_size``,
``proj_type``, ...), so defaults live in one place, the library. Every optimizer is
``chain(clip_by_global_norm(c), <optimizer>)`` (clipping acts on the full gradient, outside the
low-rank projection). Weight decay never touches 1-D leaves (norm scales, biases); which matrices
GaLore projects comes from ``models.llama.galore_mask`` (attention and MLP kernels) unless a
caller passes another mask.

Examples:
  >>> config = make("galore", rank=16)
  >>> config.name, config.rank, config.update_proj_gap
  ('galore', 16, 100)
  >>> {"adamw", "galore", "natural_galore"} <= set(REGISTRY)
  True
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, ClassVar, Optional

import jax
import optax

import ngalore_jax as ng
from models import llama
from train import lora as lora_lib
from train import low_rank as low_rank_lib
from train import relora as relora_lib

#: name -> config class, filled by :func:`register`.
REGISTRY: dict[str, type["OptimizerConfig"]] = {}

HISTORY_DTYPES = ("float32", "bfloat16", "int8")


def option(default: Any, help: str, *, type: Callable[[str], Any],  # pylint: disable=redefined-builtin
           choices: Optional[tuple[str, ...]] = None) -> Any:
  """A config field that is also a command-line flag (``--field-name``).

  Args:
    default: the field's default; ``None`` means the library's default.
    help: the flag's help text.
    type: parses the flag's text (``int``, ``float``, ``str``).
    choices: the allowed values, if a fixed set.

  Returns:
    A ``dataclasses.field``.
  """
  return dataclasses.field(default=default,
                           metadata={"help": help, "type": type, "choices": choices})


def register(cls: type["OptimizerConfig"]) -> type["OptimizerConfig"]:
  """Class decorator: adds an optimizer config to :data:`REGISTRY` under ``cls.name``."""
  if cls.name in REGISTRY:
    raise ValueError(f"optimizer {cls.name!r} registered twice")
  REGISTRY[cls.name] = cls
  return cls


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: everything but 1-D norms and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Base of the optimizer configs: a name, option fields, ``validate`` and ``build``."""

  name: ClassVar[str] = ""
  description: ClassVar[str] = ""

  def options(self) -> dict[str, Any]:
    """The option fields and their values (``None``: the library's default)."""
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

  def given_options(self) -> dict[str, Any]:
    """The options that are set (not ``None``), to pass on as keyword arguments."""
    return {k: v for k, v in self.options().items() if v is not None}

  def validate(self, model_config: Any) -> None:
    """Raises ``ValueError`` naming the option when it does not fit ``model_config``."""
    del model_config

  def build(self, learning_rate: optax.ScalarOrSchedule, *,
            projected: Callable[[Any], Any] = llama.galore_mask,
            decayed: Callable[[Any], Any] = decay_mask) -> optax.GradientTransformation:
    """The optax transformation (without gradient clipping).

    Args:
      learning_rate: a float or schedule.
      projected: which leaves a low-rank method projects (bool pytree of the params).
      decayed: which leaves get weight decay.
    """
    raise NotImplementedError

  def parametrization(self, projected: Callable[[Any], Any] = llama.galore_mask) -> Any:
    """What the optimizer trains, if not the parameters themselves.

    Returns:
      ``None`` (the optimizer updates the model parameters), or a
      :class:`train.lora.Parametrization` whose trainable part the optimizer updates (LoRA).
    """
    del projected
    return None

  def wrap_schedule(self, schedule: optax.Schedule) -> optax.Schedule:
    """The learning-rate schedule this optimizer runs with, given the run's (ReLoRA's jags)."""
    return schedule


@register
@dataclasses.dataclass(frozen=True)
class AdamWConfig(OptimizerConfig):
  """AdamW on every parameter (``optax.adamw``)."""

  name: ClassVar[str] = "adamw"
  description: ClassVar[str] = "optax.adamw on every parameter"

  b1: float = option(0.9, "Adam beta1", type=float)
  b2: float = option(0.999, "Adam beta2", type=float)
  eps: float = option(1e-8, "Adam epsilon", type=float)
  weight_decay: float = option(0.0, "decoupled weight decay (never on 1-D norms/biases)",
                               type=float)

  def validate(self, model_config: Any) -> None:
    for field in ("b1", "b2"):
      value = getattr(self, field)
      if not 0 <= value < 1:
        raise ValueError(f"`{field}` must lie in [0, 1), got {value}")
    if self.eps is not None and not (math.isfinite(self.eps) and self.eps > 0):
      raise ValueError(f"`eps` must be finite and > 0, got {self.eps}")
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"`weight_decay` must be finite and >= 0, got {self.weight_decay}")

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    del projected
    return optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay, mask=decayed)


@register
@dataclasses.dataclass(frozen=True)
class AdamW8bitConfig(AdamWConfig):
  """AdamW with both moments in 8 bits (``ng.scale_by_adam_8bit``) on every parameter."""

  name: ClassVar[str] = "adamw_8bit"
  description: ClassVar[str] = (
      "AdamW with 8-bit moments (ng.scale_by_adam_8bit: bitsandbytes' Adam8bit scheme) on every "
      "parameter")

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    del projected
    return optax.chain(
        ng.scale_by_adam_8bit(b1=self.b1, b2=self.b2, eps=self.eps),
        optax.add_decayed_weights(self.weight_decay, decayed),
        optax.scale_by_learning_rate(learning_rate))


@dataclasses.dataclass(frozen=True)
class LowRankConfig(AdamWConfig):
  """Options shared by the GaLore-style optimizers: rank, refresh gap, scale."""

  rank: int = option(64, "projection rank (at most the model width)", type=int)
  update_proj_gap: int = option(100, "steps between projector refreshes (SVD of the gradient)",
                                type=int)
  scale: float = option(0.25, "GaLore scale alpha applied to the projected-back update",
                        type=float)

  def validate(self, model_config: Any) -> None:
    super().validate(model_config)
    width = getattr(model_config, "hidden_size", None)
    if width is not None and self.rank > width:
      raise ValueError(f"`rank` {self.rank} exceeds the model width (hidden_size {width})")

  alias: ClassVar[Optional[Callable[..., optax.GradientTransformation]]] = None

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    """``alias(learning_rate, mask=projected, weight_decay_mask=decayed, **given options)``."""
    return _build_alias(self, learning_rate, projected, decayed)


@register
@dataclasses.dataclass(frozen=True)
class GaLoreConfig(LowRankConfig):
  """``ng.galore``: Adam in GaLore's subspace on the projected kernels, Adam elsewhere."""

  name: ClassVar[str] = "galore"
  description: ClassVar[str] = "ng.galore: GaLore-Adam on the attention/MLP kernels"

  proj_type: Optional[str] = option(
      None, "which side holds the projector (default reverse_std: the larger side, fewer "
      "coefficients; std: galore-torch's)", type=str,
      choices=ng.PROJ_TYPES)
  refresh_policy: Optional[str] = option(
      None, "what happens to Adam's moments (and the history) when the projector is refreshed",
      type=str, choices=ng.REFRESH_POLICIES)
  svd_method: Optional[str] = option(None, "how projectors are computed", type=str,
                                     choices=ng.SVD_METHODS)
  # An int flag (0/1): the generated command line parses int, float and str options.
  adam_8bit: Optional[int] = option(
      None, "1: Adam's moments in 8 bits (ng.scale_by_adam_8bit, bitsandbytes' Adam8bit scheme) "
      "on the projected coefficients and the other leaves", type=int, choices=(0, 1))

  alias: ClassVar[Callable[..., optax.GradientTransformation]] = staticmethod(ng.galore)


@register
@dataclasses.dataclass(frozen=True)
class NaturalGaLoreConfig(GaLoreConfig):
  """``ng.natural_galore``: the Woodbury natural-gradient step, then Adam, in the subspace."""

  name: ClassVar[str] = "natural_galore"
  description: ClassVar[str] = "ng.natural_galore: Natural GaLore on the attention/MLP kernels"

  history_size: Optional[int] = option(
      None, "gradients kept for the empirical Fisher (default 4; the paper's: 10)", type=int)
  damping: Optional[float] = option(None, "Fisher damping lambda", type=float)
  exponent: Optional[float] = option(
      None, "power of the damped Fisher, in [-1, 0): -1 is the paper's natural gradient, -0.5 "
      "the GGT-style square root", type=float)
  damping_mode: Optional[str] = option(
      None, "damping as given, or times the history's top eigenvalue", type=str,
      choices=ng.DAMPING_MODES)
  history_dtype: Optional[str] = option(
      None, "dtype of the stored gradient history (default int8; float32: the paper's)", type=str,
      choices=HISTORY_DTYPES)
  preconditioner: Optional[str] = option(
      None, "the curvature in the subspace: the paper's gradient history (woodbury) or a "
      "one-sided Kronecker factor whose memory does not grow with a history", type=str,
      choices=ng.PRECONDITIONERS)
  kronecker_beta: Optional[float] = option(
      None, "EMA decay of the Kronecker factor (--preconditioner kronecker)", type=float)

  alias: ClassVar[Callable[..., optax.GradientTransformation]] = staticmethod(ng.natural_galore)


@register
@dataclasses.dataclass(frozen=True)
class NaturalGaLoreOfficialConfig(LowRankConfig):
  """``ng.natural_galore(**ng.OFFICIAL_CODE_SETTINGS)``: the authors' code's setting."""

  name: ClassVar[str] = "natural_galore_official"
  description: ClassVar[str] = (
      "ng.natural_galore with ng.OFFICIAL_CODE_SETTINGS (two-sided projection, history 20, "
      "damping 1e-3, Adam eps 1e-6, refresh keep)")

  eps: Optional[float] = option(None, "Adam epsilon", type=float)

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    options = {**ng.OFFICIAL_CODE_SETTINGS, **self.given_options()}
    return ng.natural_galore(learning_rate, mask=projected, weight_decay_mask=decayed, **options)


@register
@dataclasses.dataclass(frozen=True)
class OptaxGaLoreConfig(LowRankConfig):
  """``optax.contrib.galore`` on the same kernels, for comparison."""

  name: ClassVar[str] = "optax_galore"
  description: ClassVar[str] = "optax.contrib.galore, for comparison"

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    def dimension_numbers(params):
      return jax.tree.map(
          lambda is_projected: optax.contrib.GaLoreDimensionNumbers() if is_projected else None,
          projected(params))
    return optax.contrib.galore(
        learning_rate, rank=self.rank, update_proj_gap=self.update_proj_gap, scale=self.scale,
        base_optimizer=optax.scale_by_adam(b1=self.b1, b2=self.b2, eps=self.eps),
        weight_decay=self.weight_decay, mask=decayed,
        weight_dimension_numbers=dimension_numbers)


def _norm_growth_limit_option() -> Any:
  return option(None, "Fira's norm-growth limiter gamma (>= 1): a step's norm may grow at most "
                "by this factor", type=float)


@dataclasses.dataclass(frozen=True)
class _LimitedConfig(LowRankConfig):
  """Options of the optimizers with Fira's norm-growth limiter; Adam's eps is the authors'."""

  eps: Optional[float] = option(None, "Adam epsilon", type=float)
  norm_growth_limit: Optional[float] = _norm_growth_limit_option()
  proj_type: Optional[str] = option(
      None, "which side holds the projector (default reverse_std: the larger side, fewer "
      "coefficients; std: galore-torch's)", type=str,
      choices=ng.PROJ_TYPES)


@register
@dataclasses.dataclass(frozen=True)
class FiraConfig(_LimitedConfig):
  """``ng.fira``: GaLore-Adam plus the gradient's residual outside the subspace, scaled."""

  name: ClassVar[str] = "fira"
  description: ClassVar[str] = "ng.fira: GaLore-Adam plus the scaled residual (Fira)"
  alias: ClassVar[Callable[..., optax.GradientTransformation]] = staticmethod(ng.fira)


@register
@dataclasses.dataclass(frozen=True)
class ApolloConfig(_LimitedConfig):
  """``ng.apollo``: channel- or tensor-wise scaling of the raw gradient from projected Adam."""

  name: ClassVar[str] = "apollo"
  description: ClassVar[str] = "ng.apollo: Adam-derived scaling factors on the raw gradient"
  alias: ClassVar[Callable[..., optax.GradientTransformation]] = staticmethod(ng.apollo)

  scale: Optional[float] = option(None, "multiplies the projected leaves' updates", type=float)
  scale_type: Optional[str] = option(None, "channel- or tensor-wise scaling factors", type=str,
                                     choices=ng.APOLLO_SCALE_TYPES)
  projection: Optional[str] = option(None, "random (regenerated from a seed) or svd projection",
                                     type=str, choices=ng.APOLLO_PROJECTIONS)


@register
@dataclasses.dataclass(frozen=True)
class ApolloMiniConfig(AdamWConfig):
  """``ng.apollo_mini``: APOLLO at rank 1 with one tensor-wise scaling factor."""

  name: ClassVar[str] = "apollo_mini"
  description: ClassVar[str] = "ng.apollo_mini: APOLLO at rank 1, tensor-wise"
  alias: ClassVar[Callable[..., optax.GradientTransformation]] = staticmethod(ng.apollo_mini)

  eps: Optional[float] = option(None, "Adam epsilon", type=float)
  update_proj_gap: int = option(100, "steps between projector refreshes (SVD of the gradient)",
                                type=int)
  scale: Optional[float] = option(None, "multiplies the projected leaves' updates", type=float)
  norm_growth_limit: Optional[float] = _norm_growth_limit_option()

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    return _build_alias(self, learning_rate, projected, decayed)


@register
@dataclasses.dataclass(frozen=True)
class LoRAConfig(AdamWConfig):
  """LoRA: AdamW on low-rank adapters of the attention/MLP kernels; the base stays frozen.

  The optimizer is plain AdamW; what it updates is the adapters (:class:`train.lora.LoRA`, from
  :meth:`parametrization`), merged into the kernels functionally in every step and for export.
  """

  name: ClassVar[str] = "lora"
  description: ClassVar[str] = ("LoRA: AdamW on low-rank adapters of the attention/MLP kernels "
                                "(base frozen, merged at export)")

  rank: int = option(16, "projection rank (at most the model width)", type=int)
  lora_alpha: float = option(32.0, "LoRA scale numerator: the adapters' product A B is scaled by "
                             "lora_alpha / rank", type=float)
  lora_others: str = option(
      "frozen", "what the parameters without adapters (embeddings, norms, lm_head) do: stay "
      "frozen, or train with AdamW (pretraining from scratch)", type=str, choices=lora_lib.OTHERS)

  def validate(self, model_config: Any) -> None:
    super().validate(model_config)
    if self.rank < 1:
      raise ValueError(f"`rank` must be an integer >= 1, got {self.rank}")
    width = getattr(model_config, "hidden_size", None)
    if width is not None and self.rank > width:
      raise ValueError(f"`rank` {self.rank} exceeds the model width (hidden_size {width})")
    if not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
      raise ValueError(f"`lora_alpha` must be finite and > 0, got {self.lora_alpha}")

  def build(self, learning_rate, *, projected=llama.galore_mask, decayed=decay_mask):
    del projected
    return optax.adamw(learning_rate, b1=self.b1, b2=self.b2, eps=self.eps,
                       weight_decay=self.weight_decay, mask=decayed)

  def parametrization(self, projected=llama.galore_mask):
    return lora_lib.LoRA(rank=self.rank, alpha=self.lora_alpha, others=self.lora_others,
                         projected=projected)


@register
@dataclasses.dataclass(frozen=True)
class LowRankFactorsConfig(AdamWConfig):
  """Low-rank pretraining: AdamW on factors ``W = A B`` of the attention/MLP kernels.

  The kernels are replaced by trained factor pairs (:class:`train.low_rank.LowRank`, from
  :meth:`parametrization`); the other parameters train densely.
  """

  name: ClassVar[str] = "low_rank"
  description: ClassVar[str] = ("low-rank pretraining: AdamW on factors W = A B of the "
                                "attention/MLP kernels, other parameters dense")

  rank: int = option(64, "projection rank (at most the model width)", type=int)

  def validate(self, model_config: Any) -> None:
    super().validate(model_config)
    if self.rank < 1:
      raise ValueError(f"`rank` must be an integer >= 1, got {self.rank}")
    width = getattr(model_config, "hidden_size", None)
    if width is not None and self.rank > width:
      raise ValueError(f"`rank` {self.rank} exceeds the model width (hidden_size {width})")

  def parametrization(self, projected=llama.galore_mask):
    return low_rank_lib.LowRank(rank=self.rank, projected=projected)


@register
@dataclasses.dataclass(frozen=True)
class ReLoRAConfig(AdamWConfig):
  """ReLoRA: LoRA on the attention/MLP kernels, merged into them and reset periodically.

  AdamW trains the adapters and the parameters without adapters; every
  ``relora_reset_every`` steps :class:`train.relora.ReLoRA` merges the adapters into the kernels,
  re-initialises them and prunes their moments, and the learning rate re-warms up
  (:func:`train.relora.jagged_schedule`).
  """

  name: ClassVar[str] = "relora"
  description: ClassVar[str] = ("ReLoRA: AdamW on LoRA adapters merged into the kernels every "
                                "--relora-reset-every steps, jagged learning rate")

  rank: int = option(64, "projection rank (at most the model width)", type=int)
  lora_alpha: float = option(32.0, "LoRA scale numerator: the adapters' product A B is scaled by "
                             "lora_alpha / rank", type=float)
  relora_reset_every: int = option(200, "ReLoRA: steps between merges of the adapters into the "
                                   "kernels (then re-initialised)", type=int)
  relora_prune: float = option(0.99, "ReLoRA: fraction of the adapters' optimizer moments zeroed "
                               "(smallest magnitudes) at each reset, in [0, 1)", type=float)
  relora_warmup_steps: int = option(50, "ReLoRA: linear learning-rate re-warm-up after each "
                                    "reset (0: none)", type=int)

  def validate(self, model_config: Any) -> None:
    super().validate(model_config)
    if self.rank < 1:
      raise ValueError(f"`rank` must be an integer >= 1, got {self.rank}")
    width = getattr(model_config, "hidden_size", None)
    if width is not None and self.rank > width:
      raise ValueError(f"`rank` {self.rank} exceeds the model width (hidden_size {width})")
    if self.relora_warmup_steps < 0:
      raise ValueError(f"`relora_warmup_steps` must be >= 0, got {self.relora_warmup_steps}")
    self.parametrization()  # rank, alpha, reset_every, prune

  def parametrization(self, projected=llama.galore_mask):
    return relora_lib.ReLoRA(rank=self.rank, alpha=self.lora_alpha, others="trained",
                             projected=projected, reset_every=self.relora_reset_every,
                             prune=self.relora_prune)

  def wrap_schedule(self, schedule):
    if self.relora_warmup_steps < 0:
      raise ValueError(f"`relora_warmup_steps` must be >= 0, got {self.relora_warmup_steps}")
    return relora_lib.jagged_schedule(schedule, self.relora_reset_every,
                                      self.relora_warmup_steps)


def _build_alias(config: OptimizerConfig, learning_rate, projected, decayed):
  """``config.alias(learning_rate, mask=..., weight_decay_mask=..., **given options)``."""
  options = config.given_options()
  if "adam_8bit" in options:
    options["adam_8bit"] = bool(options["adam_8bit"])
  if "history_dtype" in options:
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    options["history_dtype"] = jnp.dtype(options["history_dtype"])
  return type(config).alias(learning_rate, mask=projected, weight_decay_mask=decayed, **options)


def option_fields() -> dict[str, tuple[dataclasses.Field, dict[str, Any]]]:
  """Every option of every registered optimizer: name -> (field, {optimizer: its default}).

  Raises:
    TypeError: two optimizers declare one option name with different types or choices (one
      flag could not serve both).
  """
  out: dict[str, tuple[dataclasses.Field, dict[str, Any]]] = {}
  for name, cls in REGISTRY.items():
    for field in dataclasses.fields(cls):
      if field.name not in out:
        out[field.name] = (field, {name: field.default})
        continue
      known, users = out[field.name]
      if (known.metadata["type"], known.metadata["choices"]) != (
          field.metadata["type"], field.metadata["choices"]):
        raise TypeError(f"option {field.name!r} of {name} differs in type or choices from "
                        f"that of {', '.join(users)}")
      users[name] = field.default
  return out


def make(name: str, **options: Any) -> OptimizerConfig:
  """The config of optimizer ``name`` with ``options`` (unknown ones are a ``ValueError``).

  Examples:
    >>> make("natural_galore", history_size=4).history_size
    4
    >>> make("adamw", rank=4)
    Traceback (most recent call last):
    ...
    ValueError: adamw takes no option rank; its options: b1, b2, eps, weight_decay
  """
  if name not in REGISTRY:
    raise ValueError(f"unknown optimizer {name!r}; choose from {', '.join(REGISTRY)}")
  cls = REGISTRY[name]
  fields = [f.name for f in dataclasses.fields(cls)]
  unknown = [k for k in options if k not in fields]
  if unknown:
    raise ValueError(f"{name} takes no option {', '.join(unknown)}; its options: "
                     f"{', '.join(fields)}")
  return cls(**options)


def flag_message(message: str) -> str:
  """Rewrites a library error's `` `argument` `` names as command-line flags.

  Examples:
    >>> flag_message("`history_size` must be an integer >= 1, got 0.")
    '--history-size must be an integer >= 1, got 0.'
  """
  return re.sub(r"`([a-z_0-9]+)`", lambda m: "--" + m.group(1).replace("_", "-"), message)


def learning_rate_schedule(config: Any) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then cosine decay to ``lr * final_lr_ratio``.

  The optimizer may reshape it (:meth:`OptimizerConfig.wrap_schedule`: ReLoRA's re-warm-ups).

  Examples:
    >>> from train.config import TrainConfig
    >>> schedule = learning_rate_schedule(TrainConfig(steps=100, warmup_steps=10, lr=1.0))
    >>> float(schedule(10)), round(float(schedule(100)), 6)
    (1.0, 0.1)
  """
  schedule = optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=config.steps,
      end_value=config.lr * config.final_lr_ratio)
  optimizer = getattr(config, "optimizer", None)
  return schedule if optimizer is None else optimizer.wrap_schedule(schedule)


def with_clipping(tx: optax.GradientTransformation,
                  grad_clip: float) -> optax.GradientTransformation:
  """``chain(clip_by_global_norm(grad_clip), tx)``; ``grad_clip`` 0 leaves ``tx`` as it is."""
  if grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(grad_clip), tx)
  return tx


def build_optimizer(config: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer of a :class:`~train.config.TrainConfig`, with clipping in front.

  Args:
    config: the run configuration; ``config.optimizer`` is an :class:`OptimizerConfig`.
    schedule: the learning-rate schedule.

  Returns:
    An ``optax.GradientTransformation``.
  """
  return with_clipping(config.optimizer.build(schedule), config.grad_clip)
