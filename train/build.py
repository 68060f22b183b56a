"""Builds the pieces of a run from a TrainConfig: model, data, mesh, optimizer, shardings.

:func:`setup` does everything that can fail because of a bad flag, before anything
is compiled, raising :class:`~train.config.ConfigError` with a message naming the
flag. :func:`init_state`, :func:`compile_train_step` and :class:`Evaluator` turn
the result into sharded arrays and compiled functions.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from models import llama
from train import config as config_lib
from train import metrics as metrics_lib
from train import optimizers
from train import sharding as sharding_lib
from train.config import ConfigError, TrainConfig
from train.steps import TrainState, cross_entropy, make_train_step


@dataclasses.dataclass
class Setup:
  """The resolved pieces of a run (see :func:`setup`)."""
  config: TrainConfig
  model_config: Any
  workdir: str
  tokenizer: Any
  train_data: Any
  eval_data: Any
  mesh: jax.sharding.Mesh
  graphdef: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_shardings: TrainState
  abstract_state: TrainState
  batch_sharding: jax.sharding.NamedSharding


def maybe_initialize_distributed(config: TrainConfig) -> None:
  """Calls ``jax.distributed.initialize`` for multi-process launches.

  Explicit flags win; otherwise a coordinator in the environment
  (``JAX_COORDINATOR_ADDRESS``) or a multi-task SLURM/Open MPI launch lets JAX
  auto-detect the cluster. Single-process runs do nothing.
  """
  if config.coordinator_address:
    jax.distributed.initialize(config.coordinator_address, config.num_processes,
                               config.process_id)
    return
  env = os.environ
  launched = ("JAX_COORDINATOR_ADDRESS" in env
              or int(env.get("SLURM_NTASKS", "1")) > 1
              or int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1)
  if launched:
    jax.distributed.initialize()


def setup(config: TrainConfig) -> Setup:
  """Resolves model, data, mesh, optimizer and shardings; compiles nothing.

  Args:
    config: the run configuration.

  Returns:
    A :class:`Setup`.

  Raises:
    ConfigError: for any flag that does not fit (model, rank, sequence length,
      dataset path, mesh, batch size, ...).
  """
  from train import data  # pylint: disable=import-outside-toplevel

  model_cfg = config_lib.model_config(config)
  config_lib.validate(config, model_cfg)
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(mesh, config.batch_size)

  try:
    tokenizer = data.load_tokenizer(config.tokenizer, cache_dir=config.cache_dir)
  except (OSError, ValueError) as e:
    raise ConfigError(f"--tokenizer {config.tokenizer or '(default)'}: {e}") from e
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"--tokenizer: {tokenizer.vocab_size} tokens, more than the model's"
                      f" vocab_size {model_cfg.vocab_size}; add --override"
                      f" vocab_size={tokenizer.vocab_size}")
  datasets = []
  for split in ("train", "validation"):
    try:
      datasets.append(data.load_dataset(
          config.dataset, split=split, seq_len=config.seq_len, tokenizer=tokenizer,
          cache_dir=config.cache_dir, data_dir=config.data_dir))
    except (OSError, ValueError, KeyError) as e:
      named = config.dataset in str(e)
      raise ConfigError(f"--dataset{'' if named else ' ' + config.dataset}: {e}") from e

  graphdef, abstract_params = llama.abstract_params(model_cfg)
  param_sh = sharding_lib.param_shardings(mesh, abstract_params)
  abstract_params = sharding_lib.with_shardings(abstract_params, param_sh)

  schedule = optimizers.learning_rate_schedule(config)
  try:
    tx = optimizers.build_optimizer(config, schedule)
  except ValueError as e:  # the library names the argument; the user knows it as a flag
    raise ConfigError(f"--optimizer {config.optimizer.name}: "
                      f"{optimizers.flag_message(str(e))}") from e
  repl = sharding_lib.replicated(mesh)
  state_sh = TrainState(repl, param_sh, sharding_lib.state_shardings(tx, abstract_params), repl)
  abstract = jax.eval_shape(
      lambda p: TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0)),
      abstract_params)
  abstract = sharding_lib.with_shardings(abstract, state_sh)
  return Setup(config, model_cfg, config.resolved_workdir(), tokenizer, datasets[0], datasets[1],
               mesh, graphdef, tx, schedule, state_sh, abstract,
               sharding_lib.batch_sharding(mesh))


def init_state(s: Setup) -> TrainState:
  """Fresh parameters (seeded by ``--seed``), optimizer state and rng, sharded."""
  cfg, seed = s.model_config, s.config.seed

  def init() -> TrainState:
    _, params = llama.init_params(cfg, seed)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    return TrainState(jnp.zeros((), jnp.int32), params, s.tx.init(params), rng)

  return jax.jit(init, out_shardings=s.state_shardings)()


def compile_train_step(s: Setup):
  """The train step, jitted with explicit shardings and donated state, compiled ahead of time."""
  abstract_batch = jax.ShapeDtypeStruct((s.config.batch_size, s.config.seq_len + 1), jnp.int32,
                                        sharding=s.batch_sharding)
  return jax.jit(
      make_train_step(s.graphdef, s.tx, s.schedule),
      in_shardings=(s.state_shardings, s.batch_sharding),
      out_shardings=(s.state_shardings, sharding_lib.replicated(s.mesh)),
      donate_argnums=0).lower(s.abstract_state, abstract_batch).compile()


class Evaluator:
  """Mean held-out loss over fixed ``--eval-batches`` batches of the validation split."""

  def __init__(self, s: Setup):
    self._loss = jax.jit(
        lambda params, batch: cross_entropy(s.graphdef, params, batch),
        in_shardings=(s.state_shardings.params, s.batch_sharding),
        out_shardings=sharding_lib.replicated(s.mesh))
    self._batches = [
        sharding_lib.put_batch(np.asarray(b, np.int32), s.batch_sharding)
        for b in s.eval_data.eval_batches(s.config.batch_size, s.config.eval_batches)]

  def loss(self, params: Any, batch: jax.Array) -> float:
    return float(self._loss(params, batch))

  def __call__(self, params: Any) -> dict[str, float]:
    loss = float(np.mean([self.loss(params, b) for b in self._batches]))
    return {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss)}
