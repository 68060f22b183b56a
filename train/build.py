"""Builds the pieces of a run from a TrainConfig: model, data, mesh, optimizer, shardings.

:func:`setup` does everything that can fail because of a bad flag, before anything
is compiled, raising :class:`~train.config.ConfigError` with a message naming the
flag. :func:`init_state`, :func:`compile_train_step` and :class:`Evaluator` turn
the result into sharded arrays and compiled functions.

:func:`setup` is pretraining's; another entry point (``train.finetune``) loads its own
model, tokenizer and data and hands them to :func:`assemble`, which builds the rest (mesh
shardings, optimizer, its parametrisation, the abstract state) the same way for every run. What
differs between entry points is data (anything with ``batch(step, batch_size, seed)``,
``eval_batches(batch_size, n)`` and ``describe()``, batches being an array or a dict of arrays),
the loss, the initial parameters and the evaluation: fields of :class:`Setup`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

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
from train.steps import TrainState, cross_entropy, init_train_params, make_train_step
from train.steps import model_params


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
  # What differs between entry points (pretraining's defaults).
  #: the model parameters as ShapeDtypeStructs with shardings (not the held tree)
  abstract_params: Any = None
  #: train.lora.Parametrization of the optimizer, or None
  parametrization: Any = None
  #: loss(graphdef, model_params, batch) -> scalar
  loss: Callable[[Any, Any, Any], jax.Array] = cross_entropy
  #: the train batch's abstract pytree (ShapeDtypeStructs with shardings)
  abstract_batch: Any = None
  #: returns the initial model parameters (host or device arrays); None: random from --seed
  initial_params: Optional[Callable[[], Any]] = None
  #: Setup -> evaluator (called with params and step=, returns metrics; has .loss(params, batch))
  make_evaluator: Optional[Callable[["Setup"], Any]] = None


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
  mesh = make_mesh(config)

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
  return assemble(config, model_cfg, mesh, tokenizer, datasets[0], datasets[1])


def make_mesh(config: TrainConfig) -> jax.sharding.Mesh:
  """The ``--mesh`` device mesh, checked against ``--batch-size`` (``ConfigError`` if unfit)."""
  mesh = sharding_lib.make_mesh(config.mesh)
  sharding_lib.check_batch_size(mesh, config.batch_size)
  return mesh


# The key LoRA-style parametrisations draw their initial adapters from: fold_in(seed, 2).
_PARAMETRIZATION_KEY = 2


def assemble(config: TrainConfig, model_cfg: Any, mesh: jax.sharding.Mesh, tokenizer: Any,
             train_data: Any, eval_data: Any, *,
             loss: Callable[[Any, Any, Any], jax.Array] = cross_entropy,
             abstract_batch: Any = None,
             initial_params: Optional[Callable[[], Any]] = None,
             make_evaluator: Optional[Callable[[Setup], Any]] = None) -> Setup:
  """The optimizer, its parametrisation, shardings and the abstract state of a run.

  Args:
    config: the run configuration.
    model_cfg: the ``models.llama.LlamaConfig``.
    mesh: the device mesh (:func:`make_mesh`).
    tokenizer: the tokenizer (``vocab_size``).
    train_data: ``batch(step, batch_size, seed)`` and ``describe()``.
    eval_data: ``eval_batches(batch_size, n)`` and ``describe()``.
    loss: ``loss(graphdef, model_params, batch)``; next-token cross-entropy by default.
    abstract_batch: the train batch as ShapeDtypeStructs (shardings are added); default: an
      int32 ``[batch_size, seq_len + 1]`` token array.
    initial_params: returns the model parameters to start from (default: random from --seed).
    make_evaluator: ``Setup -> evaluator``; default :class:`Evaluator`.

  Raises:
    ConfigError: the optimizer rejects its options.
  """
  graphdef, abstract_params = llama.abstract_params(model_cfg)
  param_sh = sharding_lib.param_shardings(mesh, abstract_params)
  abstract_params = sharding_lib.with_shardings(abstract_params, param_sh)

  schedule = optimizers.learning_rate_schedule(config)
  try:
    tx = optimizers.build_optimizer(config, schedule)
    parametrization = config.optimizer.parametrization()
  except ValueError as e:  # the library names the argument; the user knows it as a flag
    raise ConfigError(f"--optimizer {config.optimizer.name}: "
                      f"{optimizers.flag_message(str(e))}") from e
  repl = sharding_lib.replicated(mesh)
  key = jax.random.PRNGKey(0)
  if parametrization is None:
    held_sh, abstract_trainable = param_sh, abstract_params
  else:
    held_sh = parametrization.shardings(param_sh)
    abstract_held = sharding_lib.with_shardings(
        jax.eval_shape(parametrization.init, abstract_params, key), held_sh)
    abstract_trainable = parametrization.split(abstract_held)[0]
  state_sh = TrainState(repl, held_sh, sharding_lib.state_shardings(tx, abstract_trainable), repl)
  abstract = jax.eval_shape(
      lambda p: TrainState(jnp.zeros((), jnp.int32), *init_train_params(p, tx, parametrization, key),
                           jax.random.PRNGKey(0)),
      abstract_params)
  abstract = sharding_lib.with_shardings(abstract, state_sh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  if abstract_batch is None:
    abstract_batch = jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh), abstract_batch)
  return Setup(config, model_cfg, config.resolved_workdir(), tokenizer, train_data, eval_data,
               mesh, graphdef, tx, schedule, state_sh, abstract, batch_sh,
               abstract_params=abstract_params, parametrization=parametrization, loss=loss,
               abstract_batch=abstract_batch, initial_params=initial_params,
               make_evaluator=make_evaluator)


def device_batch(host: Any, sharding: jax.sharding.NamedSharding) -> Any:
  """A host batch (an array or a dict of arrays, every leaf int32) placed on the mesh."""
  return jax.tree.map(lambda x: sharding_lib.put_batch(np.asarray(x, np.int32), sharding), host)


def init_state(s: Setup) -> TrainState:
  """Initial parameters, optimizer state and rng, sharded.

  The parameters are ``s.initial_params()`` or, without it, random ones seeded by ``--seed``;
  a parametrisation (LoRA) draws its own initial values from the seed as well.
  """
  cfg, seed = s.model_config, s.config.seed

  def init(params=None) -> TrainState:
    if params is None:
      _, params = llama.init_params(cfg, seed)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    key = jax.random.fold_in(jax.random.PRNGKey(seed), _PARAMETRIZATION_KEY)
    return TrainState(jnp.zeros((), jnp.int32),
                      *init_train_params(params, s.tx, s.parametrization, key), rng)

  if s.initial_params is None:
    return jax.jit(init, out_shardings=s.state_shardings)()
  return jax.jit(init, out_shardings=s.state_shardings)(s.initial_params())


def compile_train_step(s: Setup):
  """The train step, jitted with explicit shardings and donated state, compiled ahead of time.

  It is traced under ``jax.set_mesh(s.mesh)``: the model pins its activations' batch split
  to the mesh (``models.llama``), which keeps XLA from replicating them in the backward pass.
  """
  step = jax.jit(
      make_train_step(s.graphdef, s.tx, s.schedule, loss=s.loss,
                      parametrization=s.parametrization),
      in_shardings=(s.state_shardings, s.batch_sharding),
      out_shardings=(s.state_shardings, sharding_lib.replicated(s.mesh)),
      donate_argnums=0)
  with jax.set_mesh(s.mesh):
    return step.lower(s.abstract_state, s.abstract_batch).compile()


class Evaluator:
  """Mean held-out loss over fixed ``--eval-batches`` batches of the validation split."""

  def __init__(self, s: Setup):
    self._loss = jax.jit(
        lambda params, batch: s.loss(s.graphdef, model_params(params, s.parametrization), batch),
        in_shardings=(s.state_shardings.params, s.batch_sharding),
        out_shardings=sharding_lib.replicated(s.mesh))
    self._batches = [
        device_batch(b, s.batch_sharding)
        for b in s.eval_data.eval_batches(s.config.batch_size, s.config.eval_batches)]

  def loss(self, params: Any, batch: Any) -> float:
    return float(self._loss(params, batch))

  def __call__(self, params: Any, step: Optional[int] = None) -> dict[str, float]:
    del step
    loss = float(np.mean([self.loss(params, b) for b in self._batches]))
    return {"eval_loss": loss, "eval_perplexity": metrics_lib.perplexity(loss)}
