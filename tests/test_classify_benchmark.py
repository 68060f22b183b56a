"""Smoke test of ``python -m benchmarks.classify`` on a tiny random BERT (tests/test_classify.py).

AdamW, LoRA and Natural GaLore at rank 2, two seeds, two steps each (the seeds share each
optimizer's compiled step), in a subprocess as a user runs it, with the results and workdirs in
a temporary directory. The table is checked against
figures computed here from the runs' own ``metrics.jsonl`` and ``config.json`` files; a rerun
runs nothing, and a results file refuses runs of another setting.
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

from test_classify import _sentences, _write, tiny_bert  # noqa: F401  (tiny_bert: a fixture)

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, check=True):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  # One CPU device (not conftest's 8), little XLA optimisation: compiling dominates 2 steps.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  proc = subprocess.run([sys.executable, "-m", "benchmarks.classify", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=900, check=False)
  if check:
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc


def _cells(stdout):
  """The table's rows as ``{(optimizer, rank): {column: cell}}``."""
  lines = [line for line in stdout.splitlines() if line.startswith("| ")]
  header = [c.strip() for c in lines[0].split("|")[1:-1]]
  rows = {}
  for line in lines[1:]:
    cells = dict(zip(header, (c.strip() for c in line.split("|")[1:-1])))
    rows[cells["optimizer"], cells["rank"]] = cells
  return rows


def _pm(values, scale=100, digits=1):
  mean, std = statistics.fmean(values) * scale, statistics.stdev(values) * scale
  return f"{mean:.{digits}f} ± {std:.{digits}f}"


def test_classify_benchmark_smoke(tmp_path, tiny_bert):  # pylint: disable=redefined-outer-name
  train = _write(tmp_path / "train.tsv", _sentences(40, 1))
  dev = _write(tmp_path / "dev.tsv", _sentences(12, 2))
  out = tmp_path / "results" / "classify.json"
  runs_root = tmp_path / "runs"
  args = ["--init", str(tiny_bert), "--data", str(train), "--eval-data", str(dev),
          "--optimizers", "adamw,lora,natural_galore", "--ranks", "2", "--seeds", "2",
          "--steps", "2", "--batch-size", "4", "--seq-len", "12",
          "--lrs", "adamw=1e-3,lora=1e-2,natural_galore=1e-2",
          "--extra", "--update-proj-gap 1", "--out", str(out),
          "--workdir-root", str(runs_root), "--cache-dir", str(tmp_path / "cache")]
  proc = _run(*args)
  data = json.loads(out.read_text())
  assert sorted(data["runs"]) == [
      "adamw lr=0.001 seed=0", "adamw lr=0.001 seed=1",
      "lora r=2 lr=0.01 seed=0", "lora r=2 lr=0.01 seed=1",
      "natural_galore r=2 lr=0.01 seed=0", "natural_galore r=2 lr=0.01 seed=1"]

  # Independently of the JSON: every workdir's own files, grouped by what its config.json says.
  final, state, step0 = {}, {}, {}
  for config_path in sorted(runs_root.glob("*/*/config.json")):
    resolved = json.loads(config_path.read_text())
    optimizer = resolved["train"]["optimizer"]
    key = (optimizer["name"], str(optimizer.get("rank", "-")))
    records = [json.loads(line) for line in
               (config_path.parent / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "eval_accuracy" in r]
    # Only the first optimizer's runs evaluate at step 0 (--step0-eval first).
    assert [r["step"] for r in evals] == ([0, 2] if optimizer["name"] == "adamw" else [2])
    assert records[0]["step"] == 0 and "train_loss" in records[0]
    final.setdefault(key, {})[resolved["train"]["seed"]] = evals[-1]
    if evals[0]["step"] == 0:
      step0[resolved["train"]["seed"]] = evals[0]["eval_accuracy"]
    state[key] = resolved["memory_bytes"]["optimizer_state"]
  assert sorted(final) == [("adamw", "-"), ("lora", "2"), ("natural_galore", "2")]

  rows = _cells(proc.stdout)
  assert sorted(rows) == sorted(final)
  delta_column = "Δ acc vs lora same rank (pts, paired)"
  for key, by_seed in final.items():
    row = rows[key]
    assert row["seeds"] == "2"
    assert row["acc final (%)"] == _pm([by_seed[s]["eval_accuracy"] for s in (0, 1)])
    assert row["MCC final"] == _pm([by_seed[s]["eval_mcc"] for s in (0, 1)], 1, 3)
    assert row["optimizer state (MiB)"] == f"{state[key]['total'] / 2 ** 20:.2f}"
  # Natural GaLore's projectors, projected moments and history; AdamW's state of the rest apart.
  ng_state = state[("natural_galore", "2")]
  low_rank = sum(ng_state[c] for c in ("projectors", "inner_state", "history", "curvature"))
  assert low_rank > 0 and ng_state["total"] == low_rank + ng_state["other"]
  assert rows[("natural_galore", "2")]["of it, projected kernels' (MiB)"] == (
      f"{low_rank / 2 ** 20:.2f}")
  assert rows[("lora", "2")]["of it, projected kernels' (MiB)"] == "-"
  assert rows[("adamw", "-")]["acc @ step 0 (%)"] == _pm([step0[s] for s in (0, 1)])
  assert rows[("lora", "2")]["acc @ step 0 (%)"] == "-"
  assert f"{_pm([step0[s] for s in (0, 1)])} % over 2 seeds" in proc.stdout
  lora = final[("lora", "2")]
  paired = [final[("natural_galore", "2")][s]["eval_accuracy"] - lora[s]["eval_accuracy"]
            for s in (0, 1)]
  assert rows[("natural_galore", "2")][delta_column] == f"{_pm(paired)} (n=2)"
  assert rows[("lora", "2")][delta_column] == "-" and rows[("adamw", "-")][delta_column] == "-"
  # The paper's rank-4 averages: none at rank 2; AdamW is full fine-tuning.
  assert rows[("adamw", "-")]["paper: GLUE avg, RoBERTa-base"] == "86.28"
  assert rows[("lora", "2")]["paper: GLUE avg, RoBERTa-base"] == "-"
  labels = [int(line.rsplit("\t", 1)[1]) for line in dev.read_text().splitlines()[1:]]
  majority = max(labels.count(0), labels.count(1)) / len(labels)
  assert f"held-out accuracy over 12 sentences (majority guess {majority:.1%})" in proc.stdout
  assert "- natural_galore r2 vs lora r2: accuracy" in proc.stdout

  # Resumable: a rerun runs nothing and leaves the results as they were.
  before = out.read_text()
  again = _run(*args)
  lines = again.stderr.splitlines()
  assert sum(l.startswith("skip ") for l in lines) == 6 and not any(l.startswith("run ") for l in lines)
  assert out.read_text() == before and again.stdout == proc.stdout

  # One setting per results file.
  other = _run(*[("3" if a == "2" and args[i - 1] == "--steps" else a)
                 for i, a in enumerate(args)], check=False)
  assert other.returncode == 2 and "holds runs of another setting" in other.stderr
  assert pathlib.Path(out).read_text() == before
