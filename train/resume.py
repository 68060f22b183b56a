"""Whether a run may resume from a checkpoint written under another configuration.

Three kinds of difference between the saved configuration and the command being run:

* what is trained (the model preset, its overrides, the optimizer): refused;
* options that change the optimizer state's shapes or dtypes (``--rank``, ``--history-size``,
  ``--proj-type``, ...): refused before anything is restored, naming the flags. The set is not a
  hand-kept list: it is found by building the optimizer state of both configurations abstractly
  (``jax.eval_shape``, nothing allocated) and, when they differ, trying each changed option alone;
* everything else that changes the trajectory (lr, seed, damping, ...): allowed, with a warning
  that the run no longer reproduces an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax

from train import config as config_lib
from train import optimizers
from train.config import ConfigError, TrainConfig

# What is trained: a change is refused.
IDENTITY_FIELDS = ("model", "model_overrides")
# Run settings that change the data order or the update rule besides the optimizer's options.
TRAJECTORY_FIELDS = ("dataset", "tokenizer", "seed", "batch_size", "seq_len", "steps", "lr",
                     "warmup_steps", "final_lr_ratio", "grad_clip")


def _flag(name: str) -> str:
  return "--" + name.replace("_", "-")


def state_signature(config: TrainConfig, abstract_params: Any) -> Any:
  """The optimizer state's tree structure with each leaf's shape and dtype (no allocation).

  With a parametrisation (LoRA) the held parameters (base and adapters) are part of it.
  """
  tx = optimizers.build_optimizer(config, optimizers.learning_rate_schedule(config))
  parametrization = config.optimizer.parametrization()
  if parametrization is None:
    state = jax.eval_shape(tx.init, abstract_params)
  else:
    from train import steps  # pylint: disable=import-outside-toplevel
    state = jax.eval_shape(lambda p: steps.init_train_params(p, tx, parametrization,
                                                             jax.random.PRNGKey(0)),
                           abstract_params)
  leaves, treedef = jax.tree.flatten(state)
  return treedef, [(tuple(x.shape), str(x.dtype)) for x in leaves]


def _abstract_params(config: TrainConfig) -> Any:
  from models import llama  # pylint: disable=import-outside-toplevel
  _, params = llama.abstract_params(config_lib.model_config(config))
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)


def shape_changing_options(saved: TrainConfig, current: TrainConfig,
                           abstract_params: Any = None) -> list[str]:
  """The optimizer options whose change makes the saved optimizer state unusable.

  Args:
    saved: the configuration the checkpoint was written with (same optimizer as ``current``).
    current: the configuration being run.
    abstract_params: the model's parameters as ``ShapeDtypeStruct`` (default: built from
      ``current``'s model config).

  Returns:
    The names of the changed options that alone change the state's shapes or dtypes (all changed
    options if only their combination does); empty when the states match.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> params = {"blocks": {0: {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((16, 32),
    ...     jnp.float32)}}}}}
    >>> saved = TrainConfig(optimizer=optimizers.make("natural_galore", rank=4, damping=1e-3))
    >>> now = TrainConfig(optimizer=optimizers.make("natural_galore", rank=8, damping=1e-2))
    >>> shape_changing_options(saved, now, params)
    ['rank']
  """
  if abstract_params is None:
    abstract_params = _abstract_params(current)
  reference = state_signature(current, abstract_params)
  if state_signature(saved, abstract_params) == reference:
    return []
  old, new = saved.optimizer.options(), current.optimizer.options()
  changed = [k for k in new if old.get(k) != new[k]]
  culprits = []
  for name in changed:
    variant = dataclasses.replace(current.optimizer, **{name: old[name]})
    if state_signature(dataclasses.replace(current, optimizer=variant),
                       abstract_params) != reference:
      culprits.append(name)
  return culprits or changed


def check_resumable(saved_dict: dict[str, Any], config: TrainConfig, workdir: str,
                    abstract_params: Any = None) -> None:
  """Raises ``ConfigError`` if ``config`` cannot resume a checkpoint saved with ``saved_dict``.

  Args:
    saved_dict: the saved configuration (:meth:`TrainConfig.to_dict` of the saved run).
    config: the configuration being run.
    workdir: the run directory, for the message.
    abstract_params: the parameters as ``ShapeDtypeStruct`` (default: built from ``config``).

  Raises:
    ConfigError: another model or optimizer, or options that change the optimizer state's
      shapes; the message names the flags and their saved values.
  """
  current = config.to_dict()
  for key in getattr(type(config), "IDENTITY_FIELDS", IDENTITY_FIELDS):
    if saved_dict.get(key) != current[key]:
      raise ConfigError(
          f"--workdir {workdir} holds a run with {key}={saved_dict.get(key)!r}, not "
          f"{current[key]!r}; choose another --workdir or delete it")
  try:
    saved = type(config).from_dict(saved_dict)
  except (KeyError, TypeError, ValueError) as e:
    raise ConfigError(f"--workdir {workdir}: its checkpoint's configuration is unreadable "
                      f"({e}); choose another --workdir or delete it") from e
  if saved.optimizer.name != config.optimizer.name:
    raise ConfigError(
        f"--workdir {workdir} holds a run with optimizer={saved.optimizer.name!r}, not "
        f"{config.optimizer.name!r}; choose another --workdir or delete it")
  culprits = shape_changing_options(saved, config, abstract_params)
  if culprits:
    old, new = saved.optimizer.options(), config.optimizer.options()
    described = ", ".join(f"{_flag(k)} {old[k]} (now {new[k]})" for k in culprits)
    raise ConfigError(
        f"--workdir {workdir} holds a run saved with {described}: these change the optimizer "
        "state's shapes, so it cannot resume; rerun with the saved values or choose another "
        "--workdir")
  trajectory = getattr(type(config), "TRAJECTORY_FIELDS", TRAJECTORY_FIELDS)
  changed = [k for k in trajectory if saved_dict.get(k) != current[k]]
  old, new = saved.optimizer.options(), config.optimizer.options()
  changed += [k for k in new if old.get(k) != new[k]]
  if changed:
    logging.getLogger(__name__).warning(
        "resuming with changed %s; the run will not reproduce an uninterrupted one",
        ", ".join(_flag(k) for k in changed))
