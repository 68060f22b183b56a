"""Smoke test of ``python -m benchmarks.finetune`` on the tiny chat model (tests/finetune_fixtures.py).

Two optimizers (AdamW, LoRA), one seed, two steps, in a subprocess as a user runs it, with the
results, the workdirs and the cache in a temporary directory. The memory figures are checked
against byte counts made here from the tiny model's shapes, the table against the JSON rows.
"""

import json
import os
import subprocess
import sys

import pytest

import finetune_fixtures as ff
from train import bfcl

pytestmark = pytest.mark.slow
pytest.importorskip("torch", reason="the tiny model is made with transformers (dev extra)")
pytest.importorskip("transformers", reason="the tiny model is made with transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RANK = 4


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("finetune_bench")
  records = ff.examples(count=24, long_ones=1)
  data = ff.write_jsonl(root / "data.jsonl", records[:18] + records[-1:])  # the long one too
  held_out = ff.write_jsonl(root / "eval.jsonl", records[18:24])
  parsed = bfcl.read_examples(data) + bfcl.read_examples(held_out)
  texts = [ff.CHATML] + [bfcl.system_prompt(e.functions) + m["content"] + bfcl.target_text(e)
                         for e in parsed for m in e.messages]
  tok = ff.train_tokenizer(texts * 3)
  vocab = tok.get_vocab_size()
  gguf = ff.write_gguf(root / "tiny.gguf", ff.make_model(vocab), tok)
  return {"gguf": gguf, "data": data, "eval": held_out, "root": root, "vocab": vocab}


def _run(*args):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, "-m", "benchmarks.finetune", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  return proc.stdout, proc.stderr


def test_finetune_benchmark_smoke(files):
  root = files["root"]
  out = root / "results" / "finetune.json"
  args = ["--init", str(files["gguf"]), "--data", str(files["data"]), "--eval-data",
          str(files["eval"]), "--optimizers", "adamw,lora", "--seeds", "1", "--steps", "2",
          "--seq-len", "320", "--batch-size", "4", "--eval-examples", "2",
          "--max-new-tokens", "8", "--rank", str(RANK), "--lrs", "adamw=1e-3,lora=1e-2",
          "--extra", "--eval-batches 1 --mesh data=1", "--out", str(out),
          "--workdir-root", str(root / "runs"), "--cache-dir", str(root / "cache")]
  stdout, stderr = _run(*args)
  runs = json.loads(out.read_text())["runs"]
  assert set(runs) == {"adamw lr=0.001 seed=0", "lora lr=0.01 seed=0"}
  adamw, lora = runs["adamw lr=0.001 seed=0"], runs["lora lr=0.01 seed=0"]

  # Independent byte counts of the tiny LLaMA (d 32, ffn 64, 2 layers, 4 heads, 2 KV heads of 8).
  d, ffn, vocab = 32, 64, files["vocab"]
  kernels = [(d, d), (d, 16), (d, 16), (d, d), (d, ffn), (d, ffn), (ffn, d)] * 2
  params = 2 * vocab * d + d + 2 * 2 * d + sum(i * o for i, o in kernels)
  assert adamw["param_bytes"] == adamw["trainable_param_bytes"] == 4 * params
  # Adam's two float32 moments, plus two int32 step counts (Adam's and the schedule's).
  assert adamw["optimizer_state_bytes"] == 2 * 4 * params + 8
  adapters = sum((i + o) * RANK * 4 for i, o in kernels)
  assert lora["adapter_bytes"] == lora["trainable_param_bytes"] == adapters
  assert lora["optimizer_state_bytes"] == 2 * adapters + 8
  for r in (adamw, lora):
    # The compiled step takes the weights and the optimizer state as arguments.
    assert r["xla_argument_bytes"] >= r["param_bytes"] + r["optimizer_state_bytes"]
    assert r["xla_peak_estimate_bytes"] >= r["xla_argument_bytes"] - r["xla_alias_bytes"]
    assert r["steps"] == 2 and r["eval_step"] == 2 and r["tokens_per_sec"] > 0
    assert r["skipped_train"] == 1 and r["train_examples"] == 18 and r["skipped_eval"] == 0
    # The accuracies are those of the run's own metrics.jsonl.
    evals = {m["step"]: m["eval_accuracy"] for m in map(json.loads, open(
        os.path.join(r["workdir"], "metrics.jsonl"), encoding="utf-8")) if "eval_accuracy" in m}
    assert (r["accuracy_step0"], r["accuracy_final"]) == (evals[0], evals[2])
  # At step 0 LoRA's adapters are zero: both start from the same model, so score the same.
  assert adamw["accuracy_step0"] == lora["accuracy_step0"]
  assert adamw["optimizer_state_bytes"] > lora["optimizer_state_bytes"]
  assert "dropped long examples: 1 training, 0 held-out" in stderr

  # The table: one row per optimizer, the paired delta against LoRA from the JSON rows.
  rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
          for line in stdout.splitlines() if line.startswith("| ")}
  assert set(rows) == {"optimizer", "adamw", "lora"}
  header = rows["optimizer"]
  cell = lambda name, column: rows[name][header.index(column)]
  delta = (adamw["accuracy_final"] - lora["accuracy_final"]) * 100
  assert cell("adamw", "Δ acc vs lora (pts, paired)") == f"{delta:.1f} (n=1)"
  assert cell("lora", "Δ acc vs lora (pts, paired)") == "-"
  assert cell("adamw", "optimizer state (MiB)") == f"{(8 * params + 8) / 2 ** 20:.2f}"
  assert cell("lora", "XLA peak step (MiB)") == f"{lora['xla_peak_estimate_bytes'] / 2 ** 20:.1f}"
  assert cell("lora", "peak vs lora") == "1.00"
  assert "Dropped as longer than --seq-len 320: 1 of 19 training and 0 of 6 held-out" in stdout
  assert "- adamw vs lora: accuracy" in stdout
  assert out.with_suffix(".png").is_file()

  # Resumable: a rerun skips both runs and leaves the results as they were.
  before = out.read_text()
  _, stderr = _run(*args)
  assert stderr.count("skip ") == 2 and out.read_text() == before
