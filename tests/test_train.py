"""End-to-end pretraining runs: every optimizer, exact resume, Ctrl-C, sharding, outputs.

The model is smaller than ``tiny`` (1 layer, width 64, the tokenizer's 32k vocabulary) and the data
is a small generated corpus given as ``--dataset text:GLOB``, so a run is a few seconds after its
compilation.
"""

import json
import os
import random
import shutil
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import build
from train import checkpointing
from train import config as config_lib
from train import data as data_lib
from train import metrics as metrics_lib
from train import pretrain

STEPS = 8
MODEL = ["--override", "num_layers=1", "--override", "hidden_size=64",
         "--override", "intermediate_size=128", "--override", "max_position_embeddings=64"]


def _args(workdir, corpus, *extra):
  return [
      *MODEL, "--dataset", f"text:{corpus}/*.jsonl", "--steps", str(STEPS), "--warmup-steps", "1",
      "--batch-size", "8", "--seq-len", "32", "--lr", "1e-2", "--rank", "8",
      "--update-proj-gap", "3", "--history-size", "3", "--log-every", "1", "--eval-every", "4",
      "--eval-batches", "2", "--checkpoint-every", "4", "--no-progress", "--mesh", "data=1",
      "--workdir", str(workdir), *extra]


def _losses(workdir, key="train_loss"):
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r[key] for r in records if r.get(key) is not None}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A few hundred short generated documents (jsonl), enough for train and validation."""
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(0)
  subjects = ["the cat", "a dog", "my friend", "the old king", "our teacher", "the river"]
  verbs = ["sees", "likes", "follows", "finds", "remembers", "carries"]
  objects = ["the moon", "a small boat", "the red apple", "every book", "the quiet town"]
  with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
    for i in range(300):
      sentences = [f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                   for _ in range(rng.randint(4, 10))]
      f.write(json.dumps({"text": f"Story {i}. " + " ".join(sentences).capitalize()}) + "\n")
  return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
  """Runs each optimizer once (cached); returns a function name -> (exit code, workdir, stdout)."""
  done = {}

  def run(optimizer):
    if optimizer not in done:
      workdir = tmp_path_factory.mktemp(optimizer) / "run"
      code = pretrain.main(_args(workdir, corpus, "--optimizer", optimizer))
      done[optimizer] = code, workdir
    return done[optimizer]

  return run


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "galore", "natural_galore", "optax_galore"])
def test_end_to_end(optimizer, runs, capsys):
  code, workdir = runs(optimizer)
  out = capsys.readouterr().out
  assert code == 0
  assert "held-out perplexity" in out and str(workdir / "metrics.jsonl") in out

  records = metrics_lib.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(STEPS + 1))
  for r in records:
    assert {"step", "train_loss", "lr", "tokens_per_sec"} <= set(r)
    assert np.isfinite(r["train_loss"])
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 4, 8]
  for r in evals:
    assert r["eval_perplexity"] == pytest.approx(np.exp(r["eval_loss"]), rel=1e-6)
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.5  # it learns
  assert records[-1]["tokens_per_sec"] > 0 and records[-1]["tflops"] > 0

  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["train"]["optimizer"]["name"] == optimizer
  assert resolved["model"]["hidden_size"] == 64 and resolved["model"]["vocab_size"] == 32000
  assert any(p.name.startswith("events.out.tfevents") for p in (workdir / "tensorboard").iterdir())
  assert checkpointing.Checkpointer(workdir / "checkpoints").all_steps() == [4, STEPS]


@pytest.mark.slow
def test_ctrl_c_saves_and_a_rerun_resumes_exactly(runs, corpus, tmp_path, monkeypatch, capsys):
  """Ctrl-C during step 4 stops after it with a checkpoint; the rerun logs the same losses."""
  _, reference = runs("natural_galore")
  workdir = tmp_path / "run"
  original_batch = data_lib.PackedDataset.batch

  def batch_with_ctrl_c(self, step, batch_size, seed):
    if step == 3:
      signal.raise_signal(signal.SIGINT)
    return original_batch(self, step, batch_size, seed)

  monkeypatch.setattr(data_lib.PackedDataset, "batch", batch_with_ctrl_c)
  assert pretrain.main(_args(workdir, corpus, "--optimizer", "natural_galore")) == 130
  captured = capsys.readouterr()
  assert ("Interrupted (Ctrl-C) at step 4/8; checkpoint 4 saved; rerun the same command to"
          " resume." in captured.out)
  assert "Traceback" not in captured.err and "error:" not in captured.err
  assert checkpointing.Checkpointer(workdir / "checkpoints").all_steps() == [4]
  assert max(_losses(workdir)) == 4
  monkeypatch.undo()

  # A save that crashed half-way (orbax's temporary directory) must not be picked up.
  partial = workdir / "checkpoints" / "6.orbax-checkpoint-tmp-1700000000"
  shutil.copytree(workdir / "checkpoints" / "4", partial)
  for name in ("commit_success.txt", "_CHECKPOINT_METADATA"):
    (partial / name).unlink(missing_ok=True)  # orbax writes the first only on some file systems
  shutil.rmtree(partial / "state" / "d")

  assert pretrain.main(_args(workdir, corpus, "--optimizer", "natural_galore")) == 0
  assert _losses(workdir) == _losses(reference)  # bit-exact, steps 0-8
  assert _losses(workdir, "eval_loss") == _losses(reference, "eval_loss")

  # The reference saved step 4 asynchronously and went on training with donated buffers: its
  # checkpoint must hold the same state as the run that stopped at step 4.
  s = build.setup(config_lib.from_argv(_args(workdir, corpus, "--optimizer", "natural_galore")))
  saved = [checkpointing.Checkpointer(w / "checkpoints").restore(4, s.abstract_state)[0]
           for w in (reference, workdir)]
  for a, b in zip(*map(jax.tree.leaves, saved)):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_stop_at_then_resume_keeps_one_metrics_stream(corpus, tmp_path):
  workdir = tmp_path / "run"
  assert pretrain.main(_args(workdir, corpus, "--optimizer", "adamw", "--stop-at", "5")) == 0
  with open(workdir / "metrics.jsonl", "a", encoding="utf-8") as f:  # a line lost in a crash
    f.write(json.dumps({"step": 6, "train_loss": 123.0}) + "\n")
  assert pretrain.main(_args(workdir, corpus, "--optimizer", "adamw")) == 0
  steps = [r["step"] for r in metrics_lib.read_metrics(workdir / "metrics.jsonl")]
  assert steps == list(range(STEPS + 1))
  assert 123.0 not in _losses(workdir).values()


@pytest.mark.slow
def test_sharded_run_matches_single_device(runs, corpus, tmp_path):
  """data=2,fsdp=4 on 8 CPU devices logs the single-device losses within 1e-4."""
  _, reference = runs("natural_galore")
  workdir = tmp_path / "sharded"
  args = _args(workdir, corpus, "--optimizer", "natural_galore")
  args[args.index("--mesh") + 1] = "data=2,fsdp=4"
  assert pretrain.main(args) == 0
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert resolved["sharding_strategy"] == "fsdp"
  sharded, single = _losses(workdir), _losses(reference)
  assert sharded.keys() == single.keys()
  np.testing.assert_allclose([sharded[k] for k in single], list(single.values()), atol=1e-4)
  np.testing.assert_allclose(list(_losses(workdir, "eval_loss").values()),
                             list(_losses(reference, "eval_loss").values()), atol=1e-4)


def test_metrics_writer_drops_lines_after_the_resume_step(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  for step in range(5):
    writer.write(step, {"train_loss": float(step)})
  writer.close()
  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=2)
  writer.write(3, {"train_loss": 30.0})
  writer.close()
  assert _losses(tmp_path) == {0: 0.0, 1: 1.0, 2: 2.0, 3: 30.0}


def test_metrics_are_strict_json_and_a_torn_line_is_dropped(tmp_path, caplog):
  writer = metrics_lib.MetricsWriter(str(tmp_path))
  writer.write(0, {"train_loss": 10.0})
  writer.write(1, {"train_loss": np.float32("nan"), "grad_norm": float("inf")})
  writer.close()
  path = tmp_path / "metrics.jsonl"
  assert path.read_text().splitlines()[1] == '{"step": 1, "train_loss": null, "grad_norm": null}'
  with open(path, "a", encoding="utf-8") as f:
    f.write('{"step": 2, "train_lo')  # a process killed while writing
  assert [r["step"] for r in metrics_lib.read_metrics(path)] == [0, 1]
  assert "metrics.jsonl:3 is not a JSON object (a line torn by a crash?)" in caplog.text

  writer = metrics_lib.MetricsWriter(str(tmp_path), resume_step=1)  # resuming drops it for good
  writer.write(2, {"train_loss": 9.0})
  writer.close()
  lines = path.read_text().splitlines()
  assert [json.loads(line)["step"] for line in lines] == [0, 1, 2]


def test_checkpointer_round_trips_empty_leaves(tmp_path):

  state = {"w": jnp.arange(6.0).reshape(2, 3), "empty": jnp.zeros((0, 4)), "count": jnp.int32(7)}
  ckpt = checkpointing.Checkpointer(tmp_path / "ckpt", keep=2)
  for step in (1, 2, 3):
    ckpt.save(step, state, {"step": step})
  ckpt.wait()
  assert ckpt.all_steps() == [2, 3]
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  restored, meta = ckpt.restore(3, abstract)
  ckpt.close()
  assert meta == {"step": 3}
  assert restored["empty"].shape == (0, 4)
  np.testing.assert_array_equal(restored["w"], state["w"])
  assert int(restored["count"]) == 7


@pytest.mark.slow
def test_resuming_with_another_optimizer_is_refused(runs, corpus, capsys):
  code, workdir = runs("adamw")
  assert code == 0
  before = (workdir / "metrics.jsonl").read_text()
  assert pretrain.main(_args(workdir, corpus, "--optimizer", "galore")) == 2
  err = capsys.readouterr().err
  assert "holds a run with optimizer='adamw', not 'galore'" in err
  assert (workdir / "metrics.jsonl").read_text() == before
