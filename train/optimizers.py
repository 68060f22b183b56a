"""Builds the optax optimizer and learning-rate schedule from a TrainConfig.

Every optimizer is ``chain(clip_by_global_norm(c), <optimizer>)``: clipping
acts on the full gradient, outside the low-rank projection. Weight decay never
touches 1-D leaves (norm scales, biases); which matrices GaLore projects comes
from ``models.llama.galore_mask`` (attention and MLP kernels).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from models import llama
from train.config import TrainConfig


def learning_rate_schedule(config: TrainConfig) -> optax.Schedule:
  """Linear warm-up from 0 to ``lr``, then cosine decay to ``lr * final_lr_ratio``.

  Examples:
    >>> from train.config import TrainConfig
    >>> schedule = learning_rate_schedule(TrainConfig(steps=100, warmup_steps=10, lr=1.0))
    >>> float(schedule(10)), round(float(schedule(100)), 6)
    (1.0, 0.1)
  """
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0,
      peak_value=config.lr,
      warmup_steps=config.warmup_steps,
      decay_steps=config.steps,
      end_value=config.lr * config.final_lr_ratio)


def decay_mask(params: Any) -> Any:
  """True for leaves that get weight decay: everything but 1-D norms and biases."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _optax_galore_dims(params: Any) -> Any:
  mask = llama.galore_mask(params)
  return jax.tree.map(
      lambda projected: optax.contrib.GaLoreDimensionNumbers() if projected else None, mask)


def build_optimizer(config: TrainConfig, schedule: optax.Schedule) -> optax.GradientTransformation:
  """The optimizer named by ``config.optimizer``, with clipping in front.

  Args:
    config: the run configuration (rank, gap, scale, history, damping, ...).
    schedule: the learning-rate schedule.

  Returns:
    An ``optax.GradientTransformation``.
  """
  import ngalore_jax as ng  # pylint: disable=import-outside-toplevel

  adam = dict(b1=config.b1, b2=config.b2)
  projection = dict(rank=config.rank, update_proj_gap=config.update_proj_gap, scale=config.scale,
                    proj_type=config.proj_type, svd_method=config.svd_method)
  if config.refresh_policy is not None:
    projection["refresh_policy"] = config.refresh_policy
  name = config.optimizer
  if name == "adamw":
    tx = optax.adamw(schedule, weight_decay=config.weight_decay, mask=decay_mask, **adam)
  elif name == "galore":
    tx = ng.galore(schedule, **projection, **adam, weight_decay=config.weight_decay,
                   mask=llama.galore_mask, weight_decay_mask=decay_mask)
  elif name == "natural_galore":
    natural = dict(exponent=config.exponent, damping_mode=config.damping_mode)
    if config.history_dtype is not None:
      natural["history_dtype"] = jnp.dtype(config.history_dtype)
    if config.history_size is not None:
      natural["history_size"] = config.history_size
    if config.damping is not None:
      natural["damping"] = config.damping
    tx = ng.natural_galore(schedule, **projection, **natural, **adam,
                           weight_decay=config.weight_decay, mask=llama.galore_mask,
                           weight_decay_mask=decay_mask)
  elif name == "optax_galore":
    tx = optax.contrib.galore(
        schedule, rank=config.rank, update_proj_gap=config.update_proj_gap, scale=config.scale, base_optimizer=optax.scale_by_adam(**adam),
        weight_decay=config.weight_decay, mask=decay_mask,
        weight_dimension_numbers=_optax_galore_dims)
  else:
    raise ValueError(f"unknown optimizer {name!r}")
  if config.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip), tx)
  return tx
