"""Two processes through ``jax.distributed`` (gloo on CPU) train exactly as one process.

The end-to-end test starts real ``python -m train.pretrain`` processes: two with 2 CPU devices
each (one global mesh of 4 devices, ``--mesh data=4``) and, beside them, one process with 4
devices and the same flags. The model is one width-64 layer with the default tokenizer, trained
with adamw on a generated text file. Per-process data splitting is also checked without
processes, at the level of :func:`train.data.local_rows` and :meth:`PackedDataset.batch`.
"""

import json
import os
import pathlib
import re
import socket
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import pytest

from train import config as config_lib
from train import data as data_lib
from train import sharding as sharding_lib
from train import tokenizer as tokenizer_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
STEPS, STOP_AT, BATCH = 4, 2, 8
MODEL = ["--model", "tiny", "--override", "num_layers=1", "--override", "hidden_size=64",
         "--override", "intermediate_size=128", "--override", "max_position_embeddings=64"]
TIMEOUT_S = 600


def _simulated_rows(spec: str, processes: int = 2, devices_per_process: int = 2
                    ) -> list[np.ndarray]:
  """Each simulated process's :func:`~train.data.local_rows` under the trainer's batch sharding.

  One process holds all the devices here; process ``p`` is given the devices
  ``p * devices_per_process ...`` (jax.distributed numbers devices process by process).
  """
  devices = jax.devices()[:processes * devices_per_process]
  sharding = sharding_lib.batch_sharding(sharding_lib.make_mesh(spec, devices))
  owner = {device: i // devices_per_process for i, device in enumerate(devices)}
  index_map = sharding.devices_indices_map((BATCH, 33))
  return [data_lib.local_rows([index[0] for device, index in index_map.items()
                               if owner[device] == p], BATCH)
          for p in range(processes)]


@pytest.mark.parametrize("spec", ["data=4", "data=2,fsdp=2"])
def test_each_process_reads_its_own_rows_and_together_the_global_batch(spec):
  seq_len, num_sequences = 4, 13  # 13 sequences: batches 1 and 3 cross an epoch boundary
  tokens = np.arange(num_sequences * (seq_len + 1) + 2)
  dataset = data_lib.PackedDataset(tokens, seq_len=seq_len)
  read = []
  sequences = dataset.sequences
  dataset.sequences = lambda indices: read.append(np.asarray(indices)) or sequences(indices)

  rows = _simulated_rows(spec)
  # Data parallel over 2 processes: process p holds the p-th half of the batch.
  for p, expected in enumerate(np.array_split(np.arange(BATCH), 2)):
    np.testing.assert_array_equal(rows[p], expected, err_msg=f"process {p}")
  for step in range(4):
    whole = dataset.batch(step, BATCH, seed=3)
    parts = []
    for p, own in enumerate(rows):
      read.clear()
      parts.append(dataset.batch(step, BATCH, seed=3, rows=own))
      assert sum(len(r) for r in read) == len(own), f"process {p} read rows that are not its own"
      np.testing.assert_array_equal(parts[-1], whole[own])
    np.testing.assert_array_equal(np.concatenate(parts), whole)


def test_local_rows_of_a_replicated_batch_are_all_rows_once():
  np.testing.assert_array_equal(
      data_lib.local_rows([slice(None), slice(0, 4), slice(4, 8)], 8), np.arange(8))
  np.testing.assert_array_equal(data_lib.local_rows([slice(6, 8), slice(2, 4)], 8), [2, 3, 6, 7])


@pytest.mark.parametrize("argv, message", [
    (["--process-id", "1"], "--process-id needs --coordinator-address HOST:PORT"),
    (["--num-processes", "2"], "--num-processes needs --coordinator-address HOST:PORT"),
    (["--coordinator-address", "host0", "--num-processes", "2", "--process-id", "0"],
     "--coordinator-address 'host0': expected HOST:PORT"),
    (["--coordinator-address", "host0:1234", "--process-id", "0"],
     "--coordinator-address needs --num-processes"),
    (["--coordinator-address", "host0:1234", "--num-processes", "2"],
     "--coordinator-address needs --process-id"),
    (["--coordinator-address", "host0:1234", "--num-processes", "2", "--process-id", "2"],
     "--process-id 2 must be below --num-processes 2"),
])
def test_launch_flags_that_do_not_fit_are_one_error_before_any_process_waits(argv, message,
                                                                            capsys):
  with pytest.raises(SystemExit) as exit_info:
    config_lib.from_argv(argv)
  assert exit_info.value.code == 2
  last = capsys.readouterr().err.splitlines()[-1]
  assert last.startswith("python -m train.pretrain: error: ") and message in last, last


# --- Real processes.


class Inputs:
  """The corpus file, the tokenizer file and a cache directory shared by every run."""

  def __init__(self, root: pathlib.Path):
    self.root = root
    self.text = root / "input.txt"
    rng = np.random.default_rng(0)
    words = "the a cat dog king river moon boat apple book town sees likes finds".split()
    with open(self.text, "w", encoding="utf-8") as f:
      for i in range(1500):
        f.write(f"{i}: {' '.join(rng.choice(words, size=10))}.\n" + ("\n" if i % 5 == 4 else ""))
    self.tokenizer = tokenizer_lib.fetch_mistral_v1()
    self.cache = root / "cache"


def _command(workdir, inputs, *extra):
  return [
      sys.executable, "-m", "train.pretrain", *MODEL, "--dataset", f"text:{inputs.text}",
      "--tokenizer", str(inputs.tokenizer), "--cache-dir", str(inputs.cache),
      "--steps", str(STEPS), "--warmup-steps", "1", "--batch-size", str(BATCH),
      "--seq-len", "32", "--optimizer", "adamw", "--log-every", "1", "--eval-every", "0",
      "--eval-batches", "1", "--checkpoint-every", str(STOP_AT), "--no-progress",
      "--mesh", "data=4", "--workdir", str(workdir), *extra]


def _env(devices: int) -> dict[str, str]:
  """The test's environment with ``devices`` CPU devices per process (instead of conftest's 8)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(command, env, log: pathlib.Path) -> tuple[subprocess.Popen, pathlib.Path]:
  with open(log, "w", encoding="utf-8") as out:
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                            text=True), log


def _start_two(workdir, inputs, *extra) -> list[tuple[subprocess.Popen, pathlib.Path]]:
  address = f"127.0.0.1:{_free_port()}"
  logs = pathlib.Path(tempfile.mkdtemp(dir=inputs.root, prefix="logs-"))
  return [_start(_command(workdir, inputs, *extra, "--coordinator-address", address,
                          "--num-processes", "2", "--process-id", str(i)),
                 _env(2), logs / f"process-{i}.log")
          for i in range(2)]


def _finish(started) -> list[str]:
  """Waits for every process; returns their outputs, or fails naming the first that failed.

  One that fails stops the others at once (they would wait for it until jax.distributed's
  timeout).
  """
  deadline = time.monotonic() + TIMEOUT_S
  try:
    while time.monotonic() < deadline:
      codes = [proc.poll() for proc, _ in started]
      if None not in codes or any(codes):
        break
      time.sleep(0.2)
  finally:
    for proc, _ in started:
      if proc.poll() is None:
        proc.kill()
        proc.wait()
  codes = [proc.returncode for proc, _ in started]
  outputs = [log.read_text() for _, log in started]
  for i, (code, output) in enumerate(zip(codes, outputs)):
    if code:
      why = (f"killed: it ran past {TIMEOUT_S} s or another process failed" if code < 0 else
             "the processes talk through jax.distributed with gloo CPU collectives: is jaxlib"
             " built with gloo?")
      pytest.fail(f"process {i} of {len(started)} exited with {code} ({why})\n"
                  + "\n".join(output.splitlines()[-25:]), pytrace=False)
  return outputs


def _losses(workdir) -> list[tuple[int, float]]:
  lines = (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()
  return [(r["step"], r["train_loss"]) for r in map(json.loads, lines)]


def _assert_same_losses(got, expected):
  """The same steps, each once, and the same train losses to float32 rounding."""
  assert [step for step, _ in got] == [step for step, _ in expected]
  np.testing.assert_allclose([loss for _, loss in got], [loss for _, loss in expected],
                             rtol=1e-6, atol=0)


def _checkpoint_entries(workdir) -> list[str]:
  return sorted(os.listdir(pathlib.Path(workdir) / "checkpoints"))


@pytest.mark.slow
def test_two_processes_train_as_one_save_each_checkpoint_once_and_resume(tmp_path):
  inputs = Inputs(tmp_path)
  reference, two = tmp_path / "one-process", tmp_path / "two-processes"
  # The one-process run of all the steps beside the two processes' first STOP_AT steps.
  started = _start_two(two, inputs, "--stop-at", str(STOP_AT))
  started.append(_start(_command(reference, inputs), _env(4), tmp_path / "one-process.log"))
  _finish(started)
  expected = _losses(reference)
  assert [step for step, _ in expected] == list(range(STEPS + 1))

  # Process 0 alone writes metrics.jsonl (each step once) and config.json.
  _assert_same_losses(_losses(two), expected[:STOP_AT + 1])
  resolved = json.loads((two / "config.json").read_text())
  assert (resolved["processes"], resolved["devices"]) == (2, 4)
  assert _checkpoint_entries(two) == [str(STOP_AT)]  # one step directory, nothing left over

  outputs = _finish(_start_two(two, inputs))
  for i, output in enumerate(outputs):
    assert f"(resumed from step {STOP_AT})" in output, f"process {i} did not resume:\n{output}"
  _assert_same_losses(_losses(two), expected)
  assert _checkpoint_entries(two) == [str(STOP_AT), str(STEPS)]
