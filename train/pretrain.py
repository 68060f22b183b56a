"""Command-line entry point: ``python -m train.pretrain --help``.

Parses flags into a :class:`~train.config.TrainConfig`, runs
:func:`train.loop.train_and_evaluate` and prints a summary. Bad flags end with
one ``error:`` line (exit status 2), Ctrl-C saves a checkpoint and exits with
status 130; rerunning with the same ``--workdir`` resumes.
"""

from __future__ import annotations

import os
import sys

# On a shared CPU, OpenBLAS's threads spin-wait inside LAPACK: one 512 x 1376 SVD took 4-14 s
# instead of 0.09 s (benchmarks/README.md). It must be set before numpy/jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from typing import Any, Optional, Sequence

from train import config as config_lib
from train.config import ConfigError


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run report: progress, held-out perplexity, where outputs went."""
  done, total = summary["steps_done"], summary["steps"]
  if summary["interrupted"]:
    head = f"Interrupted at step {done}/{total}; rerun the same command to resume."
  elif summary["stopped_early"]:
    head = f"Stopped at step {done}/{total} (--stop-at); rerun without it to resume."
  else:
    head = f"Finished {done}/{total} steps."
  if summary.get("resumed_from") is not None:
    head += f" (resumed from step {summary['resumed_from']})"
  speed = summary["tokens_per_sec"]
  lines = [
      head,
      f"  time:        {_duration(summary['wall_time_sec'])} total,"
      f" {_duration(summary['compile_sec'])} compiling"
      + (f", {speed:,.0f} tokens/s" if speed else ""),
  ]
  start = summary["initial_eval_perplexity"]
  lines.append(f"  held-out perplexity: {summary['eval_perplexity']:,.2f}"
               + (f" (at step 0: {start:,.2f})" if start is not None else "")
               + f"; eval loss {summary['eval_loss']:.4f}")
  if summary["train_loss"] is not None:
    lines.append(f"  train loss:  {summary['train_loss']:.4f}")
  lines += [
      f"  metrics:     {summary['metrics']}",
      f"  tensorboard: {summary['tensorboard']}",
      f"  checkpoint:  {summary['checkpoints']} (step {summary['last_checkpoint']})",
  ]
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``python -m train.pretrain`` with ``argv``; returns the exit status."""
  config = config_lib.from_argv(argv)
  from train import build, loop  # pylint: disable=import-outside-toplevel  (imports jax)
  try:
    build.maybe_initialize_distributed(config)
    summary = loop.train_and_evaluate(config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print("\ninterrupted before a checkpoint could be saved", file=sys.stderr)
    return 130
  print(format_summary(summary), flush=True)
  return 130 if summary["interrupted"] else 0


if __name__ == "__main__":
  sys.exit(main())
