"""ReLoRA (``--optimizer relora``): periodic merges, adapter re-initialisation, moment pruning,
the jagged learning rate, and exact resume across a reset."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train import build
from train import checkpointing
from train import config as config_lib
from train import metrics as metrics_lib
from train import optimizers
from train import pretrain
from train import relora as relora_lib
from train.config import TrainConfig

PATHS = [("blocks", 0, "attn", "q", "kernel"), ("blocks", 0, "mlp", "up", "kernel")]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _params(seed=0):
  rng = np.random.default_rng(seed)
  return {
      "blocks": {0: {"attn": {"q": {"kernel": jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)}},
                     "mlp": {"up": {"kernel": jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)}},
                     "mlp_norm": {"scale": jnp.ones((8,))}}},
      "embed": {"embedding": jnp.asarray(rng.normal(size=(32, 8)), jnp.float32)},
  }


def _trained_held(method, seed=0):
  """A held tree whose adapters are non-zero, as after some steps."""
  held = method.init(_params(seed), jax.random.key(seed))
  rng = np.random.default_rng(seed + 1)
  adapters = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype),
                          held["adapters"])
  return {"base": held["base"], "adapters": adapters}


def test_merged_model_is_base_plus_scaled_adapters():
  method = relora_lib.ReLoRA(rank=3, alpha=6.0, reset_every=5)
  held = _trained_held(method)
  merged = method.merge(held)
  for path in PATHS:
    pair = _get(held["adapters"], path)
    expected = (np.asarray(_get(held["base"], path), np.float64)
                + 6.0 / 3 * np.asarray(pair["lora_a"], np.float64) @ np.asarray(pair["lora_b"]))
    np.testing.assert_allclose(_get(merged, path), expected, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(merged["embed"]["embedding"], held["base"]["embed"]["embedding"])


def _opt_state(method, held, seed=0):
  tx = optax.adamw(1e-3)
  trainable, _ = method.split(held)
  state = tx.init(trainable)
  rng = np.random.default_rng(seed + 7)
  return jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), x.dtype)
                      if x.ndim else x, state)


def test_reset_absorbs_the_adapters_reinitialises_them_and_prunes_their_moments():
  method = relora_lib.ReLoRA(rank=3, alpha=6.0, reset_every=4, prune=0.9)
  held = _trained_held(method)
  opt_state = _opt_state(method, held)
  key = jax.random.key(3)
  step = jax.jit(method.after_update)

  same_held, same_state = step(jnp.int32(3), held, opt_state, key)  # not a reset step
  jax.tree.map(np.testing.assert_array_equal, same_held, held)
  jax.tree.map(np.testing.assert_array_equal, same_state, opt_state)

  new_held, new_state = step(jnp.int32(8), held, opt_state, key)
  jax.tree.map(np.testing.assert_array_equal, method.merge(new_held), method.merge(held))
  for path in PATHS:
    pair, new_pair = _get(held["adapters"], path), _get(new_held["adapters"], path)
    expected = (np.asarray(_get(held["base"], path), np.float64)
                + 2.0 * np.asarray(pair["lora_a"], np.float64) @ np.asarray(pair["lora_b"]))
    np.testing.assert_allclose(_get(new_held["base"], path), expected, rtol=1e-5, atol=1e-5)
    assert not np.asarray(new_pair["lora_b"]).any()
    a = np.asarray(new_pair["lora_a"])
    bound = 1 / math.sqrt(a.shape[0])
    assert a.shape == pair["lora_a"].shape and np.all(np.abs(a) <= bound)
    assert np.abs(a).max() > bound / 2 and not np.array_equal(a, pair["lora_a"])

  old_adam, new_adam = opt_state[0], new_state[0]
  assert int(new_adam.count) == int(old_adam.count)
  for old_tree, new_tree in ((old_adam.mu, new_adam.mu), (old_adam.nu, new_adam.nu)):
    jax.tree.map(np.testing.assert_array_equal, new_tree["others"], old_tree["others"])
    for path in PATHS:
      for name in ("lora_a", "lora_b"):
        old = np.asarray(_get(old_tree["adapters"], path)[name]).ravel()
        new = np.asarray(_get(new_tree["adapters"], path)[name]).ravel()
        zeroed = int(math.floor(0.9 * old.size))
        assert (new == 0).sum() == zeroed
        kept = np.sort(np.argsort(np.abs(old), kind="stable")[zeroed:])
        np.testing.assert_array_equal(np.flatnonzero(new), kept)  # the largest magnitudes
        np.testing.assert_array_equal(new[kept], old[kept])


def test_prune_zero_keeps_everything():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(7, 5)), jnp.float32)
  np.testing.assert_array_equal(relora_lib.prune_by_magnitude(x, 0.0), x)
  assert int((relora_lib.prune_by_magnitude(x, 0.5) == 0).sum()) == 17


def _numpy_schedule(t, *, lr, warmup, steps, final_ratio, every, rewarm):
  if t < warmup:
    base = lr * t / warmup
  else:
    progress = min(t - warmup, steps - warmup) / (steps - warmup)
    base = lr * (final_ratio + (1 - final_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
  if t >= every and t % every < rewarm:
    base *= (t % every) / rewarm
  return base


def test_learning_rate_has_the_jags():
  config = TrainConfig(optimizer=optimizers.make("relora", relora_reset_every=10,
                                                 relora_warmup_steps=4),
                       steps=50, warmup_steps=5, lr=2.0, final_lr_ratio=0.1)
  schedule = optimizers.learning_rate_schedule(config)
  got = np.array([float(schedule(t)) for t in range(55)])
  expected = np.array([_numpy_schedule(t, lr=2.0, warmup=5, steps=50, final_ratio=0.1, every=10,
                                       rewarm=4) for t in range(55)])
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
  assert got[10] == 0 and got[20] == 0 and got[9] > 1.0


@pytest.mark.parametrize("options, flag", [
    (dict(rank=0), "`rank`"), (dict(relora_reset_every=0), "`relora_reset_every`"),
    (dict(relora_prune=1.0), "`relora_prune`"), (dict(relora_prune=-0.1), "`relora_prune`"),
    (dict(relora_warmup_steps=-1), "`relora_warmup_steps`")])
def test_bad_values_name_the_flag(options, flag):
  with pytest.raises(ValueError, match=flag):
    optimizers.make("relora", **options).validate(None)


STEPS = 4


def _args(corpus, workdir, *extra):
  return ["--override", "num_layers=1", "--override", "hidden_size=32",
          "--override", "intermediate_size=64", "--override", "max_position_embeddings=32",
          "--dataset", f"text:{corpus}", "--steps", str(STEPS), "--warmup-steps", "1",
          "--batch-size", "4", "--seq-len", "16", "--lr", "1e-2", "--optimizer", "relora",
          "--rank", "2", "--relora-reset-every", "2", "--relora-warmup-steps", "2",
          "--eval-batches", "1", "--eval-every", "3", "--log-every", "1",
          "--checkpoint-every", "1", "--keep-checkpoints", "4", "--no-progress",
          "--mesh", "data=1", "--workdir", str(workdir), *extra]


def _logged(workdir, key="train_loss"):
  records = metrics_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
  return {r["step"]: r[key] for r in records if r.get(key) is not None}


@pytest.mark.slow
def test_pretraining_merges_at_resets_and_resumes_exactly_across_one(tmp_path):
  corpus = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sees", "a", "dog", "moon", "likes"]
  corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                            for _ in range(200)))
  reference = tmp_path / "reference"
  assert pretrain.main(_args(corpus, reference)) == 0
  resumed = tmp_path / "resumed"
  assert pretrain.main(_args(corpus, resumed, "--stop-at", "2")) == 0  # just after a reset
  assert pretrain.main(_args(corpus, resumed)) == 0  # resumes at 2, resets again at 4
  losses = _logged(reference)
  assert sorted(losses) == list(range(STEPS + 1))
  assert _logged(resumed) == losses  # bit-identical
  lr = _logged(reference, "lr")  # logged at step t + 1: the rate of update t
  assert lr[3] == 0 and lr[2] > 0  # the re-warm-up after the reset at 2: factors 0, 1/2
  np.testing.assert_allclose(lr[4], 0.5 * float(s_base_schedule(_args(corpus, reference))(3)),
                             rtol=1e-6)

  s = build.setup(config_lib.from_argv(_args(corpus, reference)))
  ckpt = checkpointing.Checkpointer(reference / "checkpoints")
  held = {step: ckpt.restore(step, s.abstract_state)[0].params for step in (1, 2, 3, 4)}
  ckpt.close()
  path = ("blocks", 0, "mlp", "up", "kernel")
  for step in (2, 4):  # just reset: B = 0, the base absorbed the previous adapters
    assert not np.asarray(_get(held[step]["adapters"], path)["lora_b"]).any()
    assert not np.array_equal(_get(held[step - 1]["base"], path), _get(held[step]["base"], path))
  # between resets the kernels are not trained directly
  np.testing.assert_array_equal(_get(held[2]["base"], path), _get(held[3]["base"], path))


def s_base_schedule(args):
  """The run's warm-up + cosine, without the jags (optax, the trainer's base schedule)."""
  config = config_lib.from_argv(args)
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, config.warmup_steps, config.steps,
                                            config.lr * config.final_lr_ratio)
