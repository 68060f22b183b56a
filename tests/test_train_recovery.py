"""What real runs need: signals, divergence, damaged checkpoints and failed saves.

Every run is a real ``python -m train.pretrain`` subprocess: a one-layer, width-64 model with the
default tokenizer's 32k vocabulary, trained on a single generated text file
(``--dataset text:FILE``, split inside the file), so a run is a few seconds after its compilation.
Runs are compared with an uninterrupted reference run by their ``metrics.jsonl`` train losses,
exactly. The signal tests train with natural_galore (projectors refreshed every 3 steps, so a
resume crosses a refresh); the others with adamw, which compiles in half the time.
"""

import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from train import build
from train import checkpointing
from train import config as config_lib
from train import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS = 24
MODEL = ["--model", "tiny", "--override", "num_layers=1", "--override", "hidden_size=64",
         "--override", "intermediate_size=128", "--override", "max_position_embeddings=64"]
TIMEOUT_S = 600

pytestmark = pytest.mark.slow


class Inputs:
  """The corpus file, the tokenizer file and a cache directory shared by every run."""

  def __init__(self, root: pathlib.Path):
    self.text = root / "input.txt"
    rng = np.random.default_rng(0)
    words = "the a cat dog king river moon boat apple book town sees likes finds".split()
    with open(self.text, "w", encoding="utf-8") as f:
      for i in range(6000):
        f.write(f"{i}: {' '.join(rng.choice(words, size=10))}.\n" + ("\n" if i % 5 == 4 else ""))
    self.tokenizer = tokenizer_lib.fetch_mistral_v1()
    self.cache = root / "cache"


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
  return Inputs(tmp_path_factory.mktemp("inputs"))


def _command(workdir, inputs, *extra, optimizer="adamw"):
  options = ["--rank", "8", "--update-proj-gap", "3"] if optimizer == "natural_galore" else []
  return [
      sys.executable, "-m", "train.pretrain", *MODEL, "--dataset", f"text:{inputs.text}",
      "--tokenizer", str(inputs.tokenizer), "--cache-dir", str(inputs.cache),
      "--steps", str(STEPS), "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "32",
      "--optimizer", optimizer, *options, "--log-every", "1", "--eval-every", "0",
      "--eval-batches", "1", "--checkpoint-every", "4", "--no-progress", "--mesh", "data=1",
      "--workdir", str(workdir), *extra]


def _with_file_size_limit(command, limit):
  """``command`` started by a Python that first caps the size of any file it writes.

  SIGXFSZ is ignored (as Python does by default), so a write past the limit fails with EFBIG.
  Done with exec in the child rather than subprocess's preexec_fn, which forks this
  multithreaded (JAX) process.
  """
  launcher = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN);"
              f" resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}));"
              " os.execv(sys.executable, sys.argv[1:])")
  return [sys.executable, "-c", launcher, *command]


def _run(command, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S,
                        check=False, **kwargs)


def _losses(workdir) -> dict[int, float]:
  """Step -> train loss from metrics.jsonl, parsed as strict JSON (no NaN or Infinity)."""
  out = {}
  for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines():
    record = json.loads(line, parse_constant=_reject_constant)
    out[record["step"]] = record["train_loss"]
  return out


def _reject_constant(name):
  raise AssertionError(f"metrics.jsonl holds a bare {name}")


def _saved_steps(workdir) -> list[int]:
  """The committed checkpoints (orbax's temporary directories and *.damaged left out)."""
  return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir()
                if p.name.isdigit())


def _errors(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def reference(inputs, tmp_path_factory):
  """An uninterrupted natural_galore run of all the steps."""
  workdir = tmp_path_factory.mktemp("reference") / "run"
  result = _run(_command(workdir, inputs, optimizer="natural_galore"))
  assert result.returncode == 0, result.stderr
  return _losses(workdir)


@pytest.fixture(scope="module")
def adamw_reference(inputs, tmp_path_factory):
  """An uninterrupted adamw run of 16 steps (the schedule spans all of them)."""
  workdir = tmp_path_factory.mktemp("adamw_reference") / "run"
  result = _run(_command(workdir, inputs, "--stop-at", "16"))
  assert result.returncode == 0, result.stderr
  return _losses(workdir)


@pytest.fixture(scope="module")
def stopped_at_8(inputs, tmp_path_factory):
  """An adamw run stopped at step 8 with checkpoints 4 and 8 (copy it before changing it)."""
  workdir = tmp_path_factory.mktemp("stopped") / "run"
  result = _run(_command(workdir, inputs, "--stop-at", "8"))
  assert result.returncode == 0, result.stderr
  assert _saved_steps(workdir) == [4, 8]
  return workdir


def _wait_for_step(proc: subprocess.Popen, metrics: pathlib.Path, step: int) -> None:
  """Polls metrics.jsonl until the run has logged ``step`` (the model is compiled and training)."""
  deadline = time.monotonic() + TIMEOUT_S
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise AssertionError(f"the run ended (status {proc.returncode}) before step {step}: "
                           f"{proc.stderr.read()}")
    if metrics.exists():
      lines = [line for line in metrics.read_text().splitlines() if line.endswith("}")]
      if lines and json.loads(lines[-1])["step"] >= step:
        return
    time.sleep(0.02)
  raise AssertionError(f"no step {step} within {TIMEOUT_S} s")


# Signals.


def _interrupt(command, workdir, after_step, signum):
  """Runs ``command``, sends ``signum`` once it has logged ``after_step``; returns (out, err)."""
  with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as proc:
    try:
      _wait_for_step(proc, workdir / "metrics.jsonl", after_step)
      proc.send_signal(signum)
      out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == 128 + signum, err
  assert "Traceback" not in err and not _errors(err)
  return out, err


def test_a_signal_saves_the_step_in_flight_and_the_rerun_resumes_exactly(inputs, reference,
                                                                         tmp_path):
  """SIGINT, then SIGTERM in the resumed run, each after a step is logged: each saves its step.

  Each signal arrives while steps are being fetched and logged (--log-every 1), after step 2 of
  the first run and 2 steps into the second (resumed) one. No periodic checkpoint falls in the
  runs (--checkpoint-every 100): the only ones are the interrupts'. The third run finishes, and
  every step's loss equals the uninterrupted run's.
  """
  workdir = tmp_path / "run"
  command = _command(workdir, inputs, "--checkpoint-every", "100", optimizer="natural_galore")
  out, _ = _interrupt(command, workdir, 2, signal.SIGINT)
  first = max(_losses(workdir))
  assert 2 <= first < STEPS
  assert _saved_steps(workdir) == [first]
  assert (f"Interrupted (Ctrl-C) at step {first}/{STEPS}; checkpoint {first} saved; rerun the"
          " same command to resume." in out)

  out, _ = _interrupt(command, workdir, first + 2, signal.SIGTERM)
  second = max(_losses(workdir))
  assert first + 2 <= second < STEPS
  assert _saved_steps(workdir) == [first, second]
  assert (f"Interrupted (SIGTERM) at step {second}/{STEPS}; checkpoint {second} saved; rerun the"
          " same command to resume." in out)

  rerun = _run(command)
  assert rerun.returncode == 0, rerun.stderr
  assert f"Finished {STEPS}/{STEPS} steps. (resumed from step {second})" in rerun.stdout
  assert _losses(workdir) == reference  # bit-exact, every step


def test_a_second_ctrl_c_aborts_and_leaves_only_complete_checkpoints(inputs, reference, tmp_path):
  """The second Ctrl-C comes as soon as the first one's message is printed."""
  workdir = tmp_path / "run"
  command = _command(workdir, inputs, "--checkpoint-every", "2", optimizer="natural_galore")
  with subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        text=True) as proc:
    try:
      _wait_for_step(proc, workdir / "metrics.jsonl", 3)
      proc.send_signal(signal.SIGINT)
      for line in proc.stderr:
        if "saving a checkpoint after this step" in line:
          proc.send_signal(signal.SIGINT)
          break
      out, err = proc.communicate(timeout=TIMEOUT_S)
    finally:
      if proc.poll() is None:
        proc.kill()
  assert proc.returncode == 130, err
  assert "Ctrl-C: aborted; rerun the same command to resume" in err
  assert "Traceback" not in err and "Interrupted" not in out

  rerun = _run(command)
  assert rerun.returncode == 0, rerun.stderr
  assert "damaged" not in rerun.stderr
  assert _losses(workdir) == reference


# Divergence.


@pytest.mark.parametrize("flags, what", [
    (["--lr", "1e30", "--grad-clip", "0"],
     r"the (train loss|gradient norm) is nan.*; try a lower --lr \(now 1e\+30\) or --grad-clip"
     r" 1.0 \(now off\)"),
    (["--lr", "10"],
     r"the train loss [\d.e+]+ exceeds 10 x ln\(vocab_size\) = 103.7; .*; try a lower --lr"
     r" \(now 10\)$"),
], ids=["nan", "blow-up"])
def test_divergence_stops_with_one_message_and_saves_nothing_after_it(flags, what, inputs,
                                                                      tmp_path):
  """NaN from step 3 (lr 1e30 unclipped), or a loss of 1,000 from step 3 (lr 10)."""
  workdir = tmp_path / "run"
  result = _run(_command(workdir, inputs, "--checkpoint-every", "1", *flags))
  assert result.returncode == 1, result.stdout + result.stderr
  assert "Finished" not in result.stdout and "Traceback" not in result.stderr
  (error,) = _errors(result.stderr)
  match = re.fullmatch(r"error: training diverged at step (\d+): (.*)", error)
  assert match and re.search(what, match.group(2)), error
  bad_step = int(match.group(1))
  saved = _saved_steps(workdir)
  assert saved and max(saved) == bad_step - 1  # checkpoints up to the last good step, none after
  assert f"checkpoint {bad_step - 1} is kept as the newest" in error
  losses = _losses(workdir)  # strict JSON: a NaN loss is written as null
  assert max(losses) == bad_step and all(np.isfinite(losses[k]) for k in range(bad_step))

  s = build.setup(config_lib.from_argv(_command(workdir, inputs, *flags)[3:]))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  state, _ = ckpt.restore(max(saved), s.abstract_state)
  ckpt.close()
  floats = [x for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating)]
  assert floats and all(np.isfinite(np.asarray(x)).all() for x in floats)


# Damaged checkpoints, failed saves, torn metrics.


def _truncate_largest_array_file(step_dir: pathlib.Path) -> None:
  largest = max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)
  os.truncate(largest, largest.stat().st_size // 2)


DAMAGES = {
    "truncated array file": _truncate_largest_array_file,
    "deleted _METADATA": lambda d: (d / "state" / "_METADATA").unlink(),
    "emptied manifest": lambda d: (d / "state" / "manifest.ocdbt").write_bytes(b""),
    "emptied metadata file": lambda d: (d / "meta" / "metadata").write_bytes(b""),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_newest_checkpoint_is_reported_and_skipped(damage, inputs, stopped_at_8,
                                                             adamw_reference, tmp_path):
  """Checkpoint 8 of a run stopped there is damaged, and metrics.jsonl ends in a torn line."""
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_8, workdir)
  DAMAGES[damage](workdir / "checkpoints" / "8")
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:
    f.write('{"step": 9, "train_lo')  # the process died while writing step 9's line

  result = _run(_command(workdir, inputs, "--stop-at", "12"))
  assert result.returncode == 0, result.stderr
  assert "Traceback" not in result.stderr and not _errors(result.stderr)
  warnings = [line for line in result.stderr.splitlines() if "checkpoint 8" in line]
  assert len(warnings) == 2, result.stderr
  assert "skipping it (damaged) and trying an older checkpoint" in warnings[0]
  assert "moved damaged checkpoint 8 to" in warnings[1]
  assert "metrics.jsonl:10 is not a JSON object (a line torn by a crash?)" in result.stderr
  assert "(resumed from step 4)" in result.stdout
  assert _saved_steps(workdir) == [4, 8, 12]  # 8 saved afresh
  assert (workdir / "checkpoints" / "8.damaged").is_dir()
  assert _losses(workdir) == {k: v for k, v in adamw_reference.items() if k <= 12}


def test_no_intact_checkpoint_is_one_error(inputs, stopped_at_8, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_8, workdir)
  for step in (4, 8):
    (workdir / "checkpoints" / str(step) / "meta" / "metadata").write_bytes(b"")
  result = _run(_command(workdir, inputs))
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  (error,) = _errors(result.stderr)
  assert error.startswith(f"error: no checkpoint in {workdir}/checkpoints can be restored")
  assert error.endswith("move the directory away to start afresh")
  assert _saved_steps(workdir) == [4, 8]  # nothing moved or deleted


def test_a_failed_save_stops_the_run_and_the_last_good_checkpoint_resumes(inputs, stopped_at_8,
                                                                          adamw_reference,
                                                                          tmp_path):
  """A disk that fills up: the resumed run cannot write a file past 1 MiB.

  ``RLIMIT_FSIZE`` is set in the child before it starts (see :func:`_with_file_size_limit`): the
  write of the checkpoint's array file (8 MB of embeddings) fails with EFBIG in orbax's background
  thread, as it fails with ENOSPC on a full disk. metrics.jsonl and TensorBoard stay far below the limit.
  ``--keep-checkpoints 1``: had the failed save counted, checkpoint 8 would be rotated out.
  """
  workdir = tmp_path / "run"
  shutil.copytree(stopped_at_8, workdir)

  result = _run(_with_file_size_limit(_command(workdir, inputs, "--keep-checkpoints", "1"),
                                      1 << 20))
  assert result.returncode == 1, result.stdout + result.stderr
  assert "Traceback" not in result.stderr
  assert _errors(result.stderr) == [
      f"error: saving checkpoint 12 in {workdir}/checkpoints failed: File too large [errno 27];"
      " the newest intact checkpoint is step 8; rerun to resume from it"]
  assert max(_losses(workdir)) <= 16  # stopped at the failed save, not at the last step
  assert _saved_steps(workdir) == [4, 8]

  rerun = _run(_command(workdir, inputs, "--stop-at", "16"))
  assert rerun.returncode == 0, rerun.stderr
  assert "(resumed from step 8)" in rerun.stdout
  assert _losses(workdir) == adamw_reference
