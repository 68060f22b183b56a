"""Low-rank pretraining (``--optimizer low_rank``): factors ``W = A B`` replace the kernels."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from train import build
from train import checkpointing
from train import config as config_lib
from train import low_rank as low_rank_lib
from train import optimizers
from train import pretrain

PARAMS = {
    "blocks": {0: {"attn": {"q": {"kernel": jnp.ones((256, 512))}},
                   "mlp": {"up": {"kernel": jnp.ones((512, 128))}},
                   "mlp_norm": {"scale": jnp.ones((256,))}}},
    "embed": {"embedding": jnp.ones((32, 256))},
}


def _kernel_paths():
  return [("blocks", 0, "attn", "q", "kernel"), ("blocks", 0, "mlp", "up", "kernel")]


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def test_factors_replace_the_kernels_and_the_product_has_the_dense_variance():
  method = low_rank_lib.LowRank(rank=64)
  held = method.init(PARAMS, jax.random.key(0))
  assert "attn" not in held["others"]["blocks"][0]  # no dense kernel is held
  np.testing.assert_array_equal(held["others"]["embed"]["embedding"], PARAMS["embed"]["embedding"])
  merged = method.merge(held)
  for path in _kernel_paths():
    pair = _get(held["factors"], path)
    a, b = np.asarray(pair["a"], np.float64), np.asarray(pair["b"], np.float64)
    assert a.shape == (_get(PARAMS, path).shape[0], 64)
    assert b.shape == (64, _get(PARAMS, path).shape[1])
    # each factor: N(0, 0.02 / sqrt(64)); the product's entries: variance 0.02 ** 2
    np.testing.assert_allclose(a.std(), np.sqrt(0.02 / 8), rtol=0.03)
    np.testing.assert_allclose(b.std(), np.sqrt(0.02 / 8), rtol=0.03)
    product = a @ b
    np.testing.assert_allclose(product.std(), 0.02, rtol=0.08)
    np.testing.assert_allclose(_get(merged, path), product, rtol=1e-4, atol=1e-7)
  np.testing.assert_array_equal(merged["blocks"][0]["mlp_norm"]["scale"], np.ones(256))
  assert jax.tree.structure(merged) == jax.tree.structure(PARAMS)
  trainable, frozen = method.split(held)
  assert trainable is held and not frozen and method.combine(trainable, frozen) is held


def test_gradients_reach_both_factors():
  """d/dA sum(C * A B) = C B^T and d/dB = A^T C (NumPy)."""
  method = low_rank_lib.LowRank(rank=3)
  params = {"blocks": {0: {"mlp": {"up": {"kernel": jnp.zeros((5, 4))}}}}}
  held = method.init(params, jax.random.key(1))
  c = np.random.default_rng(0).normal(size=(5, 4))
  grads = jax.grad(lambda h: jnp.sum(jnp.asarray(c, jnp.float32)
                                     * method.merge(h)["blocks"][0]["mlp"]["up"]["kernel"]))(held)
  pair = held["factors"]["blocks"][0]["mlp"]["up"]["kernel"]
  a, b = np.asarray(pair["a"], np.float64), np.asarray(pair["b"], np.float64)
  grad = grads["factors"]["blocks"][0]["mlp"]["up"]["kernel"]
  np.testing.assert_allclose(grad["a"], c @ b.T, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(grad["b"], a.T @ c, rtol=1e-5, atol=1e-7)


def test_rank_is_clipped_and_bad_values_name_the_flag():
  held = low_rank_lib.LowRank(rank=1000).init(PARAMS, jax.random.key(0))
  assert held["factors"]["blocks"][0]["mlp"]["up"]["kernel"]["a"].shape == (512, 128)
  with pytest.raises(ValueError, match="`rank`"):
    low_rank_lib.LowRank(rank=0)
  config = optimizers.make("low_rank", rank=0)
  with pytest.raises(ValueError, match="`rank`"):
    config.validate(None)
  assert isinstance(optimizers.make("low_rank", rank=4).parametrization(), low_rank_lib.LowRank)


@pytest.mark.slow
def test_pretraining_trains_the_factors_and_holds_no_dense_kernel(tmp_path):
  corpus = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sees", "a", "dog", "moon", "likes"]
  corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                            for _ in range(200)))
  workdir = tmp_path / "run"
  args = ["--override", "num_layers=1", "--override", "hidden_size=32",
          "--override", "intermediate_size=64", "--override", "max_position_embeddings=32",
          "--dataset", f"text:{corpus}", "--steps", "3", "--warmup-steps", "1",
          "--batch-size", "4", "--seq-len", "16", "--optimizer", "low_rank", "--rank", "4",
          "--eval-batches", "1", "--checkpoint-every", "1", "--no-progress", "--mesh", "data=1",
          "--workdir", str(workdir)]
  assert pretrain.main(args) == 0
  s = build.setup(config_lib.from_argv(args))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  first, last = (ckpt.restore(step, s.abstract_state)[0] for step in (1, 3))
  ckpt.close()
  assert "up" not in last.params["others"]["blocks"][0].get("mlp", {})
  up_first = first.params["factors"]["blocks"][0]["mlp"]["up"]["kernel"]
  up_last = last.params["factors"]["blocks"][0]["mlp"]["up"]["kernel"]
  assert up_last["a"].shape == (32, 4) and up_last["b"].shape == (4, 64)
  assert not np.array_equal(up_first["b"], up_last["b"])
  assert not np.array_equal(first.params["others"]["embed"]["embedding"],
                            last.params["others"]["embed"]["embedding"])
  # AdamW's moments cover the factors, not dense kernels
  mu_shapes = {tuple(x.shape) for x in jax.tree.leaves(last.opt_state)}
  assert (32, 64) not in mu_shapes and (4, 64) in mu_shapes


def test_memory_benchmark_accounts_the_reparametrised_baselines(tmp_path, capsys):
  """60m (d 512, ffn 1376, 8 layers) at rank 128: independent parameter counts (float32)."""
  from benchmarks import memory  # pylint: disable=import-outside-toplevel
  out = tmp_path / "memory.json"
  memory.main(["--presets", "60m", "--out", str(out)])
  capsys.readouterr()
  rows = {r["optimizer"]: r for r in json.loads(out.read_text())}
  dense = 8 * (4 * 512 * 512 + 3 * 512 * 1376)
  factors = 8 * (4 * (512 * 128 + 128 * 512) + 3 * (512 * 128 + 128 * 1376))
  full = rows["adamw"]["param_bytes"]
  assert rows["low_rank"]["param_bytes"] == full + 4 * (factors - dense)
  assert rows["relora"]["param_bytes"] == full + 4 * factors  # base + adapters
  trainable = full + 4 * (factors - dense)  # both: factors/adapters + the other params
  for name in ("low_rank", "relora"):
    assert rows[name]["total"] == 2 * trainable + 4  # AdamW's two moments and its count
