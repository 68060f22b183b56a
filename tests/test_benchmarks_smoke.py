"""Smoke test: ``python -m benchmarks.speed`` and ``python -m benchmarks.convergence`` at a toy size.

Each script runs in its own process (as a user runs it), on a model of one narrow layer, with a
generated corpus and a cache in a temporary directory, so nothing is downloaded and the user's
cache and the results under ``benchmarks/results`` are left alone. Together they take well
under 30 s; the real benchmark runs are described in ``benchmarks/README.md``.
"""

import json
import os
import random
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(module, *args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user runs the scripts
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A few hundred short generated documents (jsonl), enough for train and validation."""
  root = tmp_path_factory.mktemp("bench_corpus")
  rng = random.Random(0)
  words = ["the cat", "a dog", "the king", "sees", "likes", "finds", "the moon", "a boat"]
  with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
    for i in range(300):
      text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
      f.write(json.dumps({"text": f"Story {i}. {text}."}) + "\n")
  return root


def test_speed_smoke(tmp_path):
  out = tmp_path / "speed.json"
  stdout = _run(
      "benchmarks.speed", "--presets", "tiny", "--optimizers", "adamw,ng.galore (exact SVD)",
      "--override", "num_layers=1", "--override", "hidden_size=32",
      "--override", "intermediate_size=64", "--override", "num_heads=2",
      "--override", "num_kv_heads=2", "--override", "vocab_size=256", "--rank", "4",
      "--batch-size", "2", "--seq-len", "8", "--repeats", "2",
      "--svd-shape", "32x48", "--svd-rank", "4", "--svd-repeats", "1",
      "--out", str(out))
  results = json.loads(out.read_text())
  rows = {r["optimizer"]: r for r in results["presets"][0]["rows"]}
  assert set(rows) == {"adamw", "ng.galore (exact SVD)"}
  assert rows["adamw"]["step_vs_adamw"] == 1.0
  galore = rows["ng.galore (exact SVD)"]
  assert galore["step_ms"] > 0 and galore["refresh_step_ms"] > 0
  assert galore["amortised_step_ms"] >= galore["step_ms"]
  assert results["svd"]["randomized_captured_energy_vs_exact"] > 0.5
  assert galore["step_ms_min"] <= galore["step_ms"]
  assert "| adamw |" in stdout and "MFU" in stdout


def test_convergence_smoke(tmp_path, corpus):
  out = tmp_path / "convergence.json"
  stdout = _run(
      "benchmarks.convergence", "--dataset", f"text:{corpus}/*.jsonl", "--vocab", "300",
      "--hidden", "32", "--layers", "1", "--ffn", "64", "--heads", "2", "--seq-len", "16",
      "--batch-size", "2", "--steps", "4", "--warmup-steps", "1", "--eval-every", "2",
      "--eval-sequences", "4", "--rank", "4", "--update-proj-gap", "2",
      "--optimizers", "natural_galore_sqrt,low_rank", "--lrs", "1e-2", "--phase", "all",
      "--seeds", "1", "--ablation", "exponent",
      "--out", str(out), "--cache-dir", str(tmp_path / "cache"))
  runs = json.loads(out.read_text())["runs"]
  # 2 variants x 1 seed (low_rank trains a parametrisation: factors, not the kernels), plus the
  # exponent ablation of natural_galore_sqrt.
  assert len(runs) == 3
  for record in runs.values():
    assert record["eval_steps"] == [0, 2, 4]
    assert all(l == l and l < 10 for l in record["eval_loss"])  # finite
  assert "Δ vs galore" in stdout and "exponent" in stdout
  assert out.with_suffix(".png").is_file()


def test_memory_smoke(tmp_path):
  """The memory table for the 60m preset (eval_shape only: nothing allocated, a few seconds)."""
  out = tmp_path / "memory.json"
  stdout = _run("benchmarks.memory", "--presets", "60m", "--out", str(out))
  rows = json.loads(out.read_text())
  assert "| 60m (128) | ng.natural_galore |" in stdout
  by_name = {r["optimizer"]: r for r in rows}
  # Independent count: AdamW keeps two float32 moments per parameter, plus a step counter.
  assert by_name["adamw"]["total"] == 2 * by_name["adamw"]["param_bytes"] + 4
  # 60m: d 512, ffn 1376, 8 layers, rank 128; 'std' coefficients are r x max(m, n) per kernel
  # (q, k, v, o: 128 x 512; gate, up, down: 128 x 1376); the paper's history: 10 in float32.
  coefficients = 8 * (4 * 128 * 512 + 3 * 128 * 1376)
  paper = by_name["ng.natural_galore (std, float32 history 10)"]
  assert paper["history"] == 10 * coefficients * 4
  # The defaults: 'reverse_std' coefficients are r x min(m, n) = 128 x 512 for all 7 kernels of
  # each layer; 4 of them in int8, plus one float32 scale per stored gradient and kernel.
  kernels = 8 * 7
  default = by_name["ng.natural_galore"]
  assert default["history"] == 4 * kernels * 128 * 512 * 1 + 4 * kernels * 4


def test_summary_pairs_each_variant_with_the_base_on_shared_seeds():
  from benchmarks import summary  # pylint: disable=import-outside-toplevel

  def record(variant, lr, seed, loss):
    # Seed 0 runs are the lr sweep's (the lr is chosen on them), the others the seeds phase's.
    return {"variant": variant, "overrides": {}, "lr": lr, "seed": seed,
            "tag": "sweep" if seed == 0 else "seeds",
            "final_eval_loss": loss, "diverged": False}
  runs = {}
  for variant, lr, seed, loss in [("galore", 0.01, 0, 4.0), ("galore", 0.01, 1, 4.2),
                                  ("galore", 0.03, 0, 4.5),  # a worse lr: not chosen
                                  ("fira", 0.01, 0, 3.9), ("fira", 0.01, 1, 4.3),
                                  ("fira", 0.01, 2, 4.0)]:
    runs[f"{variant} {lr} {seed}"] = record(variant, lr, seed, loss)
  gib = 1024 ** 3
  memory = [{"preset": p, "optimizer": name, "total": total * gib}
            for p in summary.PRESETS
            for name, total in [("adamw", 4.0), ("ng.fira", 1.0),
                                ("ng.galore (std: galore-torch's side)", 2.0)]]
  text = summary.table(runs, memory, base="galore")
  fira = next(line for line in text.splitlines() if line.startswith("| fira "))
  # Seeds 0 and 1 are shared: deltas -0.1 and +0.1, so mean 0 with std 0.1414, 1 of 2 better.
  assert "| 3 | 4.0667 ± 0.2082 |" in fira and "0.0000 ± 0.1414 (1/2 better)" in fira
  assert fira.endswith("| 1.00 (0.25x) | 1.00 (0.25x) | 1.00 (0.25x) |")
  galore = next(line for line in text.splitlines() if line.startswith("| galore "))
  assert "| 0.01 | 2 | 4.1000 ± 0.1414 | - | 2.00 (0.50x) |" in galore
