"""The training loop: resume or initialise, train, log, evaluate, checkpoint, stop cleanly.

:func:`train_and_evaluate` is the whole run (what ``python -m train.pretrain``
calls). Its set-up (:func:`train.build.setup`) does everything that can fail
because of a bad flag before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Optional

import jax
import numpy as np

from train import build
from train import checkpointing
from train import metrics as metrics_lib
from train import resume
from train import sharding as sharding_lib
from train.build import Setup
from train.config import ConfigError, TrainConfig
from train.steps import TrainState

class _SigintFlag:
  """Turns the first Ctrl-C into a request to save and stop; a second one aborts."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def _handle(self, signum, frame):
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    print("\nCtrl-C: saving a checkpoint after this step (press again to abort)",
          file=sys.stderr, flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)
    return self

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)


def _check_resumable(saved: dict[str, Any], config: TrainConfig, workdir: str) -> None:
  resume.check_resumable(saved, config, workdir)


def _initial_eval_perplexity(path: str) -> Optional[float]:
  if not os.path.exists(path):
    return None
  for record in metrics_lib.read_metrics(path):
    if record.get("step") == 0 and "eval_perplexity" in record:
      return record["eval_perplexity"]
  return None


def _restore_or_init(s: Setup,
                     ckpt: checkpointing.Checkpointer) -> tuple[TrainState, Optional[int]]:
  """The newest checkpoint's state (after checking it belongs to this run), or a fresh one."""
  step = ckpt.latest_step()
  if step is None:
    return build.init_state(s), None
  _check_resumable(ckpt.restore_meta(step)["config"], s.config, s.workdir)
  state, meta = ckpt.restore(step, s.abstract_state)
  if meta["data_position"] != int(state.step):
    raise RuntimeError(f"checkpoint {step}: data position {meta['data_position']}"
                       f" does not match step {int(state.step)}")
  return state, step


def _write_resolved_config(s: Setup, resumed_from: Optional[int]) -> None:
  """``WORKDIR/config.json``: flags, model config, data, mesh, what was resumed."""
  resolved = {
      "train": s.config.to_dict(),
      "model": dataclasses.asdict(s.model_config),
      "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params)),
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


def _peak_flops(config: TrainConfig) -> Optional[float]:
  if config.peak_tflops:
    return config.peak_tflops * 1e12
  per_device = metrics_lib.peak_flops_per_device(jax.devices()[0].device_kind)
  return per_device * jax.device_count() if per_device else None


def train_and_evaluate(config: TrainConfig) -> dict[str, Any]:
  """Runs (or resumes) pretraining and returns a summary.

  Resumes from the newest checkpoint in ``WORKDIR/checkpoints`` if there is
  one. Writes ``WORKDIR/config.json``, ``metrics.jsonl``, TensorBoard events
  under ``tensorboard/`` and async orbax checkpoints (the last
  ``--keep-checkpoints``, one every ``--checkpoint-every`` steps and at the end).

  Args:
    config: the run configuration.

  Returns:
    A dict with the final ``train_loss``, ``eval_loss``, ``eval_perplexity``,
    ``initial_eval_perplexity``, ``steps_done``, ``interrupted``,
    ``tokens_per_sec``, ``wall_time_sec``, ``compile_sec`` and output paths.

  Raises:
    ConfigError: for bad flags (before any compilation).
  """
  wall_start = time.perf_counter()
  s = build.setup(config)
  ckpt = checkpointing.Checkpointer(os.path.join(s.workdir, "checkpoints"),
                                    keep=config.keep_checkpoints)
  try:
    state, resumed_from = _restore_or_init(s, ckpt)
    lead = jax.process_index() == 0
    if lead:
      _write_resolved_config(s, resumed_from)
    writer = metrics_lib.MetricsWriter(s.workdir, resume_step=int(state.step), enabled=lead)
    try:
      summary = _train(s, state, ckpt, writer, lead)
    finally:
      writer.close()
  finally:
    ckpt.close()
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
           writer: metrics_lib.MetricsWriter, lead: bool) -> dict[str, Any]:
  """The step loop: train, log, evaluate, checkpoint, stop on Ctrl-C or --stop-at."""
  config = s.config
  start, end = int(state.step), config.stop_at or config.steps
  tokens_per_step = config.batch_size * config.seq_len
  flops_per_token = float(s.model_config.flops_per_token(config.seq_len))
  peak = _peak_flops(config)

  compile_start = time.perf_counter()
  train_step = build.compile_train_step(s)
  compile_sec = time.perf_counter() - compile_start
  evaluate = build.Evaluator(s)

  def train_batch(step: int) -> jax.Array:
    host = s.train_data.batch(step, config.batch_size, config.seed)
    return sharding_lib.put_batch(np.asarray(host, np.int32), s.batch_sharding)

  def meta(step: int) -> dict[str, Any]:
    return {"step": step, "data_position": step, "seed": config.seed, "config": config.to_dict()}

  last_eval, last_eval_step = {}, -1
  if start == 0:
    last_eval, last_eval_step = evaluate(state.params), 0
    writer.write(0, {"train_loss": evaluate.loss(state.params, train_batch(0)),
                     "lr": float(s.schedule(0)), "tokens_per_sec": None, **last_eval})

  from tqdm.auto import tqdm  # pylint: disable=import-outside-toplevel
  bar = tqdm(total=end, initial=start, disable=not (config.progress and lead),
             desc=f"{config.optimizer.name} {config.model}", unit="step", dynamic_ncols=True)
  record: dict[str, Any] = {}
  train_tokens, train_seconds = 0, 0.0
  step = start
  with _SigintFlag() as sigint:
    t_last, step_last = time.perf_counter(), start
    while step < end:
      state, step_metrics = train_step(state, train_batch(step))
      step += 1
      stopping = sigint.requested or step == end
      eval_due = step == config.steps or (config.eval_every and step % config.eval_every == 0)
      if step % config.log_every == 0 or eval_due or stopping:
        host = jax.device_get(step_metrics)
        record = {k: float(host.pop(k)) for k in ("train_loss", "lr")}
        seconds = time.perf_counter() - t_last
        tokens = (step - step_last) * tokens_per_step
        train_tokens, train_seconds = train_tokens + tokens, train_seconds + seconds
        record.update(metrics_lib.throughput(tokens, seconds, flops_per_token=flops_per_token,
                                             peak_flops=peak))
        record["step_time_sec"] = seconds / (step - step_last)
        record.update({k: float(v) for k, v in host.items()})
        if eval_due:
          last_eval, last_eval_step = evaluate(state.params), step
          record.update(last_eval)
        writer.write(step, record)
        bar.set_postfix(loss=f"{record['train_loss']:.3f}",
                        tok_s=f"{record['tokens_per_sec']:.0f}", refresh=False)
        t_last, step_last = time.perf_counter(), step
      if stopping or (config.checkpoint_every and step % config.checkpoint_every == 0):
        ckpt.save(step, state, meta(step))
      bar.update(1)
      if sigint.requested:
        break
  bar.close()
  if last_eval_step != step:  # stopped between evaluations, or resumed a finished run
    last_eval = evaluate(state.params)
  return {
      "steps_done": step,
      "steps": config.steps,
      "interrupted": sigint.requested,
      "stopped_early": step < config.steps,
      "train_loss": record.get("train_loss"),
      **last_eval,
      "tokens_per_sec": train_tokens / train_seconds if train_seconds else None,
      "compile_sec": compile_sec,
      "num_params": sum(math.prod(x.shape) for x in jax.tree.leaves(s.abstract_state.params)),
  }
