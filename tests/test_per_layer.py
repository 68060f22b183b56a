"""``train.per_layer``: layer-by-layer updates equal the ordinary step; its clipping modes."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from models import llama
from train import optimizers
from train import per_layer
from train import steps

CONFIG = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3,
                           num_heads=4, num_kv_heads=2)
SCHEDULE = optax.constant_schedule(1e-2)


def _batch(seed=1):
  return jax.random.randint(jax.random.PRNGKey(seed), (2, 9), 0, CONFIG.vocab_size)


def _state(params, opt_state):
  return steps.TrainState(jnp.zeros((), jnp.int32), params, opt_state, jax.random.PRNGKey(0))


def _run_both(config, tx, num_steps=3):
  graphdef, params = llama.init_params(config, 0)
  ordinary = jax.jit(steps.make_train_step(graphdef, tx, SCHEDULE))
  layered = jax.jit(per_layer.make_train_step(graphdef, tx, SCHEDULE))
  a, b = _state(params, tx.init(params)), _state(params, per_layer.init(tx, params))
  for i in range(num_steps):
    a, metrics_a = ordinary(a, _batch(i))
    b, metrics_b = layered(b, _batch(i))
  return a, b, metrics_a, metrics_b


@pytest.mark.parametrize("name,options", [
    ("adamw", {}),
    ("adamw_8bit", {}),
    ("galore", {"rank": 4, "update_proj_gap": 2, "adam_8bit": 1}),
    ("natural_galore", {"rank": 4, "update_proj_gap": 2, "adam_8bit": 1}),
])
def test_same_params_as_the_ordinary_step(name, options):
  tx = optimizers.make(name, **options).build(1e-2)
  a, b, metrics_a, metrics_b = _run_both(CONFIG, tx)
  assert jax.tree.structure(a.params) == jax.tree.structure(b.params)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5, rtol=1e-4)
  for key in ("train_loss", "grad_norm", "update_norm", "lr"):
    np.testing.assert_allclose(metrics_a[key], metrics_b[key], rtol=1e-4)
  assert int(b.step) == 3


def test_tied_embeddings():
  config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                             num_heads=4, tie_word_embeddings=True)
  a, b, _, _ = _run_both(config, optax.adam(1e-2), num_steps=2)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5, rtol=1e-4)


def test_parts_round_trip_and_keep_key_paths():
  _, params = llama.abstract_params(CONFIG)
  parts = per_layer.split_parts(params)
  assert len(parts["blocks"]) == CONFIG.num_layers
  assert list(parts["blocks"][2]) == ["blocks"] and list(parts["blocks"][2]["blocks"]) == [2]
  assert jax.tree.structure(per_layer.merge_parts(parts)) == jax.tree.structure(params)
  # Path-based masks select the same leaves in a part as in the whole tree.
  assert llama.galore_mask(parts["blocks"][1])["blocks"][1]["mlp"]["up"]["kernel"]
  assert not llama.galore_mask(parts["head"])["lm_head"]["kernel"]


def _reference_grads(graphdef, params, batch):
  return jax.grad(steps.cross_entropy, argnums=1)(graphdef, params, batch)


def _numpy_parts(tree):
  """The per-part leaves of ``tree`` as float64 NumPy arrays, part by part."""
  parts = per_layer.split_parts(tree)
  return [[np.asarray(x, np.float64) for x in jax.tree.leaves(p)]
          for p in (parts["embed"], *parts["blocks"], parts["head"])]


@pytest.mark.parametrize("mode", ["layer", "global"])
def test_clipping_matches_numpy(mode):
  clip_norm, lr = 0.05, 0.1
  graphdef, params = llama.init_params(CONFIG, 0)
  batch = _batch()
  tx = optax.sgd(lr)
  step = jax.jit(per_layer.make_train_step(graphdef, tx, SCHEDULE, clip=mode,
                                           clip_norm=clip_norm))
  new, metrics = step(_state(params, per_layer.init(tx, params)), batch)

  grads = _numpy_parts(_reference_grads(graphdef, params, batch))
  norms = [np.sqrt(sum(np.sum(g * g) for g in part)) for part in grads]
  total = np.sqrt(sum(n * n for n in norms))
  if mode == "layer":
    factors = [min(1.0, clip_norm / n) for n in norms]
    assert max(factors) < 1.0  # every part is clipped here
  else:
    factors = [min(1.0, clip_norm / total)] * len(norms)
  expected = [[p - lr * f * g for p, g in zip(part_p, part_g)]
              for part_p, part_g, f in zip(_numpy_parts(params), grads, factors)]
  for part_e, part_n in zip(expected, _numpy_parts(new.params)):
    for e, n in zip(part_e, part_n):
      np.testing.assert_allclose(n, e, atol=2e-6, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], total, rtol=1e-5)


def test_global_clip_equals_optax_clip_by_global_norm():
  graphdef, params = llama.init_params(CONFIG, 0)
  tx = optax.adam(1e-2)
  clipped = optax.chain(optax.clip_by_global_norm(0.1), tx)
  ordinary = jax.jit(steps.make_train_step(graphdef, clipped, SCHEDULE))
  layered = jax.jit(per_layer.make_train_step(graphdef, tx, SCHEDULE, clip="global",
                                              clip_norm=0.1))
  a, b = _state(params, clipped.init(params)), _state(params, per_layer.init(tx, params))
  for i in range(2):
    a, _ = ordinary(a, _batch(i))
    b, _ = layered(b, _batch(i))
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=5e-5, rtol=1e-4)


def test_unknown_clip_mode():
  with pytest.raises(ValueError, match="clip must be one of"):
    per_layer.make_train_step(None, optax.sgd(1.0), SCHEDULE, clip="leaf")
