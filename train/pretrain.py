"""Command-line entry point: ``python -m train.pretrain --help``.

Parses flags into a :class:`~train.config.TrainConfig`, runs
:func:`train.loop.train_and_evaluate` and prints a summary. Exit statuses:

* 0: finished (or stopped at ``--stop-at``), last step saved;
* 1: the run diverged (non-finite or exploding loss or gradient norm; the bad
  state is not saved) or a checkpoint could not be saved or restored; one
  ``error:`` line says which, and which checkpoint is the newest good one;
* 2: a bad flag or a ``--workdir`` that cannot be used: one ``error:`` line;
* 130 / 143: Ctrl-C (SIGINT) / SIGTERM: the step in flight was finished and
  saved; a second signal aborts without waiting for that save.

Rerunning the same command with the same ``--workdir`` resumes at the step after
the newest intact checkpoint, reproducing the losses of an uninterrupted run.
"""

from __future__ import annotations

import os
import signal
import sys

# On a shared CPU, OpenBLAS's threads spin-wait inside LAPACK: one 512 x 1376 SVD took 4-14 s
# instead of 0.09 s (benchmarks/README.md). It must be set before numpy/jax load OpenBLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
from typing import Any, Callable, Optional, Sequence

from train import config as config_lib
from train.config import ConfigError


def _duration(seconds: float) -> str:
  minutes, seconds = divmod(int(round(seconds)), 60)
  return f"{minutes}m{seconds:02d}s" if minutes else f"{seconds}s"


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run report: progress, held-out perplexity, where outputs went."""
  done, total = summary["steps_done"], summary["steps"]
  if summary["interrupted"]:
    name = "Ctrl-C" if summary.get("signal") == signal.SIGINT else (
        signal.Signals(summary["signal"]).name if summary.get("signal") else "signal")
    saved = summary["last_checkpoint"]
    kept = ("no checkpoint" if saved is None else f"checkpoint {saved} saved" if saved == done
            else f"newest checkpoint {saved}")
    head = f"Interrupted ({name}) at step {done}/{total}; {kept}; rerun the same command to resume."
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
  if summary.get("eval_loss") is not None:
    at = summary.get("eval_step")
    lines.append(f"  held-out perplexity: {summary['eval_perplexity']:,.2f}"
                 + (f" at step {at}" if at is not None and at != done else "")
                 + (f" (at step 0: {start:,.2f})" if start is not None and at != 0 else "")
                 + f"; eval loss {summary['eval_loss']:.4f}")
  if summary["train_loss"] is not None:
    lines.append(f"  train loss:  {summary['train_loss']:.4f}")
  lines += [
      f"  metrics:     {summary['metrics']}",
      f"  tensorboard: {summary['tensorboard']}",
      f"  checkpoint:  {summary['checkpoints']} (step {summary['last_checkpoint']})",
  ]
  return "\n".join(lines)


def run_to_exit_status(config: Any, run: Callable[[], dict[str, Any]],
                       summarize: Callable[[dict[str, Any]], str] = format_summary) -> int:
  """Runs a training entry point and turns its outcome into an exit status and messages.

  Shared by every entry point (``train.pretrain``, ``train.finetune``): 0 when finished, 2 and
  one ``error:`` line for a bad flag, 1 for divergence or a failed checkpoint, ``128 + signal``
  when interrupted (after the step in flight was saved) or aborted by a second signal.

  Args:
    config: the parsed configuration (for a multi-process launch).
    run: trains and returns the summary.
    summarize: formats the summary printed at the end.

  Returns:
    The process exit status.
  """
  # pylint: disable-next=import-outside-toplevel  (imports jax)
  from train import build, checkpointing, loop
  try:
    build.maybe_initialize_distributed(config)
    summary = run()
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except (loop.TrainingError, checkpointing.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  except KeyboardInterrupt as e:  # before training started, or loop.Aborted (a second signal)
    signum = getattr(e, "signum", signal.SIGINT)
    print(f"\n{loop.signal_name(signum)}: aborted; rerun the same command to resume from the"
          " newest complete checkpoint", file=sys.stderr)
    return 128 + signum
  print(summarize(summary), flush=True)
  return 128 + summary["signal"] if summary["interrupted"] else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``python -m train.pretrain`` with ``argv``; returns the exit status."""
  config = config_lib.from_argv(argv)
  from train import loop  # pylint: disable=import-outside-toplevel  (imports jax)
  return run_to_exit_status(config, lambda: loop.train_and_evaluate(config))


if __name__ == "__main__":
  sys.exit(main())
