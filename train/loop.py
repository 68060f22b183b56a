"""The training loop: resume or initialise, train, log, evaluate, checkpoint, stop cleanly.

:func:`train_and_evaluate` is the whole run (what ``python -m train.pretrain``
calls). It checks ``--workdir`` first, then its set-up
(:func:`train.build.setup`) does everything that can fail because of a bad
flag before anything is compiled.

A run stops

* at ``--steps`` (or ``--stop-at``), after saving the last step;
* on SIGINT (Ctrl-C) or SIGTERM: the step in flight finishes, is logged and
  saved, and the save is waited for; a second signal aborts at once (orbax
  moves a checkpoint into place only once it is complete, so an aborted save
  never becomes the newest);
* on divergence, with :class:`TrainingError` naming the step: a train loss or
  gradient norm that is not finite, or a train loss above ``DIVERGENCE_FACTOR``
  (10) times ``ln(vocab_size)``, ten times the loss of a uniform guess (104 for
  a 32k vocabulary), which no run that learns reaches. The test runs on the
  device every step and is read at each logged step and before each save, so
  no state after a bad step is saved; nor is one whose parameters or optimizer
  state hold NaN or infinity (checked before every save). The newest
  checkpoint stays the last good one;
* when a checkpoint cannot be saved (a full disk), with
  :class:`~train.checkpointing.CheckpointError` at the next step; the previous
  checkpoint stays intact.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import signal
import tempfile
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from train import build
from train import checkpointing
from train import metrics as metrics_lib
from train import resume
from train import sharding as sharding_lib
from train.build import Setup
from train.config import ConfigError, TrainConfig
from train.steps import TrainState

# Training stops when the train loss exceeds this multiple of ln(vocab_size), the loss of a uniform
# guess over the vocabulary (104 for 32k tokens): a run that is learning never gets there.
DIVERGENCE_FACTOR = 10.0


class TrainingError(RuntimeError):
  """The run cannot go on (it diverged); the message is one line."""


class Aborted(KeyboardInterrupt):
  """A second SIGINT or SIGTERM while the first one's checkpoint was being made.

  Attributes:
    signum: the signal.
  """

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum


def signal_name(signum: int) -> str:
  """``"Ctrl-C"`` for SIGINT, else the signal's name (``"SIGTERM"``)."""
  return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


class _StopSignals:
  """SIGINT (Ctrl-C) and SIGTERM ask the loop to finish the step in flight, save it and stop.

  A second one aborts (raises :class:`Aborted`). Installed only in the main thread.

  Attributes:
    signum: the first signal received, or ``None``.
  """

  SIGNALS = (signal.SIGINT, signal.SIGTERM)

  def __init__(self):
    self.signum: Optional[int] = None
    self._previous: dict[int, Any] = {}

  @property
  def requested(self) -> bool:
    return self.signum is not None

  def _handle(self, signum, frame):
    del frame
    if self.signum is not None:
      raise Aborted(signum)
    self.signum = signum
    # os.write, not print: the handler may run while the main thread is inside a print.
    os.write(2, f"\n{signal_name(signum)}: saving a checkpoint after this step (send it again"
                " to abort)\n".encode())

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for signum in self.SIGNALS:
        self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)


def _all_finite(tree: Any) -> jax.Array:
  """Whether every floating-point leaf of ``tree`` is finite (a scalar bool array)."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(flags).all() if flags else jnp.array(True)


class _DivergenceCheck:
  """Notes on the device the first step whose loss or gradient norm is bad; read when syncing.

  A step is bad when its train loss or gradient norm is not finite, or its loss exceeds
  ``DIVERGENCE_FACTOR * ln(vocab_size)``. Tracking costs one tiny dispatch per step and no
  host synchronisation; the loop reads the result where it synchronises anyway (logging, saving).
  """

  def __init__(self, s: Setup, ckpt: checkpointing.Checkpointer):
    self.limit = DIVERGENCE_FACTOR * math.log(s.model_config.vocab_size)
    self._config, self._ckpt = s.config, ckpt
    repl = sharding_lib.replicated(s.mesh)
    limit = self.limit

    def update(first, metrics, step):
      loss, grad_norm = metrics["train_loss"], metrics["grad_norm"]
      bad = ~jnp.isfinite(loss) | ~jnp.isfinite(grad_norm) | (loss > limit)
      new = (first[0] < 0) & bad
      return (jnp.where(new, step, first[0]), jnp.where(new, loss, first[1]),
              jnp.where(new, grad_norm, first[2]))

    self._update = jax.jit(update, out_shardings=repl)
    self._finite = jax.jit(_all_finite, out_shardings=repl)
    self._first = jax.device_put((np.int32(-1), np.float32(0), np.float32(0)), repl)

  def update(self, step_metrics: dict[str, jax.Array], step: int) -> None:
    self._first = self._update(self._first, step_metrics, np.int32(step))

  def _error(self, what: str) -> TrainingError:
    config, newest = self._config, self._ckpt.latest_step()
    kept = (f"checkpoint {newest} is kept as the newest" if newest is not None
            else "no checkpoint was saved")
    hint = f"try a lower --lr (now {config.lr:g})"
    if not config.grad_clip:
      hint += " or --grad-clip 1.0 (now off)"
    return TrainingError(f"training diverged {what}; {kept}; {hint}")

  def raise_if_diverged(self) -> None:
    """Raises :class:`TrainingError` naming the first bad step, if there was one."""
    step, loss, grad_norm = (x.item() for x in jax.device_get(self._first))
    if step < 0:
      return
    if not math.isfinite(loss):
      what = f"the train loss is {loss}"
    elif not math.isfinite(grad_norm):
      what = f"the gradient norm is {grad_norm} (train loss {loss:.4g})"
    else:
      what = (f"the train loss {loss:.4g} exceeds {DIVERGENCE_FACTOR:g} x ln(vocab_size) ="
              f" {self.limit:.1f}")
    raise self._error(f"at step {step}: {what}")

  def check_state(self, state: TrainState, step: int) -> None:
    """Raises :class:`TrainingError` if the parameters or optimizer state hold NaN or inf."""
    if not bool(self._finite((state.params, state.opt_state))):
      raise self._error(f"by step {step}: the parameters or optimizer state are not finite")


def _check_resumable(saved: dict[str, Any], config: TrainConfig, workdir: str,
                     abstract_params: Any = None) -> None:
  resume.check_resumable(saved, config, workdir, abstract_params)


def _initial_eval_perplexity(path: str) -> Optional[float]:
  if not os.path.exists(path):
    return None
  for record in metrics_lib.read_metrics(path):
    if record.get("step") == 0 and "eval_perplexity" in record:
      return record["eval_perplexity"]
  return None


def _check_workdir(workdir: str) -> None:
  """Raises ``ConfigError`` unless ``workdir`` is, or can be made, a writable directory.

  Creates nothing: it writes (and removes) an empty probe directory in ``workdir`` or in its
  nearest existing ancestor.
  """
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    where = "is a file" if existing == path else f"is under the file {existing}"
    raise ConfigError(f"--workdir {workdir} {where}; give a directory")
  try:
    probe = tempfile.mkdtemp(prefix=".write-test-", dir=existing)
  except OSError as e:
    raise ConfigError(f"--workdir {workdir}: cannot write in {existing} ({e.strerror})") from e
  os.rmdir(probe)


def _restore_or_init(s: Setup,
                     ckpt: checkpointing.Checkpointer) -> tuple[TrainState, Optional[int]]:
  """The newest intact checkpoint's state (after checking it belongs to this run), or a fresh one.

  Raises:
    ConfigError: the checkpoint was written by a run this one cannot continue.
    CheckpointError: there are checkpoints but none can be restored.
  """
  def check(meta: dict[str, Any]) -> None:
    if not isinstance(meta.get("config"), dict):
      raise checkpointing.CheckpointError(
          f"checkpoint {meta.get('step')} in {ckpt.directory}: its metadata holds no config")
    _check_resumable(meta["config"], s.config, s.workdir, None if s.abstract_params is None else
                     jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                  s.abstract_params))

  step, state, meta = ckpt.restore_newest(s.abstract_state, check=check)
  if step is None:
    return build.init_state(s), None
  if meta.get("data_position") != int(state.step):
    raise checkpointing.CheckpointError(
        f"checkpoint {step} in {ckpt.directory}: data position {meta.get('data_position')}"
        f" does not match step {int(state.step)}")
  return state, step


def _write_resolved_config(s: Setup, resumed_from: Optional[int]) -> None:
  """``WORKDIR/config.json``: flags, model config, data, mesh, what was resumed."""
  from train import lora  # pylint: disable=import-outside-toplevel
  memory = lora.memory_bytes(s.abstract_state.params, s.abstract_state.opt_state,
                             s.parametrization)
  trainable = (s.abstract_state.params if s.parametrization is None
               else s.parametrization.split(s.abstract_state.params)[0])
  resolved = {
      "train": s.config.to_dict(),
      "model": dataclasses.asdict(s.model_config),
      "num_params": _num_params(s),
      "trainable_params": sum(math.prod(x.shape) for x in jax.tree.leaves(trainable)),
      "memory_bytes": memory,
      "flops_per_token": float(s.model_config.flops_per_token(s.config.seq_len)),
      "dataset": s.train_data.describe(),
      "eval_dataset": s.eval_data.describe(),
      "tokenizer_vocab_size": s.tokenizer.vocab_size,
      "mesh": dict(s.mesh.shape),
      "sharding_strategy": sharding_lib.strategy(s.mesh),
      "devices": jax.device_count(),
      "processes": jax.process_count(),
      "resumed_from": resumed_from,
  }
  os.makedirs(s.workdir, exist_ok=True)
  with open(os.path.join(s.workdir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(resolved, f, indent=2, sort_keys=True, default=str)


def _num_params(s: Setup) -> int:
  """Parameters of the model (a LoRA run's adapters are not among them): the model config's
  analytic count, the one the model tests check against the parameter tree."""
  return s.model_config.num_params()


def _peak_flops(config: TrainConfig) -> Optional[float]:
  if config.peak_tflops:
    return config.peak_tflops * 1e12
  per_device = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  return per_device * jax.device_count() if per_device else None


def _batch_reader(s: Setup) -> Callable[[int], Any]:
  """Returns ``step -> training batch on the mesh``, reading only this process's rows.

  Every process feeds the rows of the global batch that its devices hold (all of them in a
  single-process run) through ``jax.make_array_from_process_local_data``; packed token data
  reads just those sequences, other data (fine-tuning) builds the batch and keeps those rows.
  """
  from train import data as data_lib  # pylint: disable=import-outside-toplevel
  config = s.config
  index_map = s.batch_sharding.addressable_devices_indices_map(
      jax.tree.leaves(s.abstract_batch)[0].shape)
  rows = data_lib.local_rows([index[0] for index in index_map.values()], config.batch_size)
  reads_rows = "rows" in inspect.signature(s.train_data.batch).parameters

  def read(step: int) -> Any:
    if reads_rows:
      host = s.train_data.batch(step, config.batch_size, config.seed, rows=rows)
    else:
      host = jax.tree.map(lambda x: np.asarray(x)[rows],
                          s.train_data.batch(step, config.batch_size, config.seed))
    return jax.tree.map(
        lambda x, abstract: jax.make_array_from_process_local_data(
            s.batch_sharding, np.asarray(x, np.int32), abstract.shape),
        host, s.abstract_batch)

  return read


def train_and_evaluate(config: TrainConfig,
                       setup: Optional[Callable[[TrainConfig], Setup]] = None) -> dict[str, Any]:
  """Runs (or resumes) pretraining and returns a summary.

  Resumes from the newest intact checkpoint in ``WORKDIR/checkpoints`` if
  there is one (damaged newer ones are reported and moved aside). Writes
  ``WORKDIR/config.json``, ``metrics.jsonl``, TensorBoard events under
  ``tensorboard/`` and async orbax checkpoints (the last
  ``--keep-checkpoints``, one every ``--checkpoint-every`` steps and at the
  end).

  SIGINT (Ctrl-C) and SIGTERM finish the step in flight, save it, wait for the
  save and return with ``interrupted`` set; a second signal raises
  :class:`Aborted`. A diverged run (see :class:`_DivergenceCheck`) raises
  :class:`TrainingError` without saving the bad state.

  Args:
    config: the run configuration.
    setup: builds the run's :class:`~train.build.Setup` from ``config``
      (default :func:`train.build.setup`, pretraining); another entry point passes its own.

  Returns:
    A dict with the final ``train_loss``, ``eval_loss``, ``eval_perplexity``
    and ``eval_step`` (absent when an interrupted run evaluated nothing),
    ``initial_eval_perplexity``, ``steps_done``, ``interrupted``, ``signal``,
    ``tokens_per_sec``, ``wall_time_sec``, ``compile_sec`` and output paths.

  Raises:
    ConfigError: for bad flags (before any compilation), or a checkpoint of
      another run in ``--workdir``.
    TrainingError: the loss or gradient norm went bad.
    checkpointing.CheckpointError: a save failed, or no checkpoint can be restored.
    Aborted: a second SIGINT or SIGTERM.
  """
  wall_start = time.perf_counter()
  _check_workdir(config.resolved_workdir())  # before loading any data
  s = (setup or build.setup)(config)
  with _StopSignals() as stop:
    ckpt = checkpointing.Checkpointer(os.path.join(s.workdir, "checkpoints"),
                                      keep=config.keep_checkpoints)
    try:
      state, resumed_from = _restore_or_init(s, ckpt)
      lead = jax.process_index() == 0
      if lead:
        _write_resolved_config(s, resumed_from)
      writer = metrics_lib.MetricsWriter(s.workdir, resume_step=int(state.step), enabled=lead)
      try:
        summary = _train(s, state, ckpt, writer, lead, stop)
      finally:
        writer.close()
    finally:
      ckpt.close()  # waits for the last save
  summary.update({
      "resumed_from": resumed_from,
      "wall_time_sec": time.perf_counter() - wall_start,
      "initial_eval_perplexity": _initial_eval_perplexity(writer.path),
      "workdir": os.path.abspath(s.workdir),
      "metrics": os.path.abspath(writer.path),
      "tensorboard": os.path.abspath(writer.tensorboard_dir),
      "checkpoints": ckpt.directory,
      "last_checkpoint": ckpt.latest_step(),
  })
  return summary


def _train(s: Setup, state: TrainState, ckpt: checkpointing.Checkpointer,
           writer: metrics_lib.MetricsWriter, lead: bool, stop: _StopSignals) -> dict[str, Any]:
  """The step loop: train, log, evaluate, checkpoint; stop at the end, on a signal or --stop-at."""
  config = s.config
  start, end = int(state.step), config.stop_at or config.steps
  tokens_per_step = config.batch_size * config.seq_len
  flops_per_token = float(s.model_config.flops_per_token(config.seq_len))
  peak = _peak_flops(config)

  compile_start = time.perf_counter()
  train_step = build.compile_train_step(s)
  compile_sec = time.perf_counter() - compile_start
  evaluate = (s.make_evaluator or build.Evaluator)(s)
  divergence = _DivergenceCheck(s, ckpt)

  train_batch = _batch_reader(s)

  last_eval, last_eval_step = {}, None
  if start == 0 and not stop.requested:
    last_eval, last_eval_step = evaluate(state.params, step=0), 0
    writer.write(0, {"train_loss": evaluate.loss(state.params, train_batch(0)),
                     "lr": float(s.schedule(0)), "tokens_per_sec": None, **last_eval})

  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=end, initial=start, disable=not (config.progress and lead),
             desc=f"{config.optimizer.name} {config.model}", unit="step", dynamic_ncols=True)
  record: dict[str, Any] = {}
  train_tokens, train_seconds = 0, 0.0
  t_last, step_last = time.perf_counter(), start

  def log(step: int, step_metrics: dict[str, jax.Array], eval_due: bool) -> None:
    nonlocal record, train_tokens, train_seconds, t_last, step_last, last_eval, last_eval_step
    host = jax.device_get(step_metrics)
    record = {k: float(host.pop(k)) for k in ("train_loss", "lr")}
    seconds = time.perf_counter() - t_last
    tokens = (step - step_last) * tokens_per_step
    train_tokens, train_seconds = train_tokens + tokens, train_seconds + seconds
    record.update(metrics_lib.throughput(tokens, seconds, flops_per_token=flops_per_token,
                                         peak_flops=peak))
    record["step_time_sec"] = seconds / (step - step_last)
    record.update({k: float(v) for k, v in host.items()})
    try:
      divergence.raise_if_diverged()
      if eval_due:
        last_eval, last_eval_step = evaluate(state.params, step=step), step
        record.update(last_eval)
    finally:
      writer.write(step, record)
    bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                    tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
    t_last, step_last = time.perf_counter(), step

  def save(step: int) -> None:
    divergence.raise_if_diverged()  # never save a state past a bad step ...
    divergence.check_state(state, step)  # ... nor one with non-finite numbers
    ckpt.save(step, state, {"step": step, "data_position": step, "seed": config.seed,
                            "config": config.to_dict()})

  step, logged, saved = start, start, start
  step_metrics = None
  # A signal only sets stop.signum: the step in flight finishes, and the code after the loop
  # logs and saves it whenever the signal came (during the step, the fetch of its metrics,
  # an evaluation or a save).
  while step < end and not stop.requested:
    state, step_metrics = train_step(state, train_batch(step))
    step += 1
    divergence.update(step_metrics, step)
    eval_due = step == config.steps or bool(config.eval_every and step % config.eval_every == 0)
    if step % config.log_every == 0 or eval_due or step == end:
      log(step, step_metrics, eval_due)
      logged = step
    if config.checkpoint_every and step % config.checkpoint_every == 0:
      save(step)
      saved = step
    ckpt.check()  # a background save that failed stops the run here
    bar.update(1)
  if logged != step:
    log(step, step_metrics, eval_due=False)
  if saved != step:
    save(step)
  bar.close()
  interrupted = stop.requested and step < end
  if last_eval_step != step and not interrupted:  # finished between evaluations, or resumed
    last_eval, last_eval_step = evaluate(state.params, step=step), step  # a finished run
  return {
      "steps_done": step,
      "steps": config.steps,
      "interrupted": interrupted,
      "signal": stop.signum if interrupted else None,
      "stopped_early": step < config.steps,
      "train_loss": record.get("train_loss"),
      **last_eval,
      "eval_step": last_eval_step if last_eval else None,
      "tokens_per_sec": train_tokens / train_seconds if train_seconds else None,
      "compile_sec": compile_sec,
      "num_params": _num_params(s),
  }
