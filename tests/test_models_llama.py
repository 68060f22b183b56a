"""The LLaMA model: shapes, causality, presets, functional API, remat, labels, sharding, training."""

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from models import llama

SMALL = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=32)


# One jitted forward for the whole module: eager NNX calls dispatch op by op and are slow.
_forward = jax.jit(llama.apply, static_argnums=0)


def _tokens(batch, seq, vocab, seed=0):
  return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (batch, seq)), jnp.int32)


def _leaf_count(params):
  return sum(math.prod(p.shape) for p in jax.tree.leaves(params))


@pytest.fixture(scope="module")
def small():
  return llama.init_params(SMALL, seed=0)


# Shapes, dtypes, config.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_shape_and_dtype(dtype):
  cfg = dataclasses.replace(SMALL, dtype=dtype)
  graphdef, params = llama.init_params(cfg, seed=0)
  logits = _forward(graphdef, params, _tokens(2, 7, cfg.vocab_size))
  assert logits.shape == (2, 7, cfg.vocab_size)
  assert logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))


def test_param_dtype_and_tied_embeddings():
  cfg = dataclasses.replace(SMALL, param_dtype=jnp.bfloat16, tie_word_embeddings=True)
  assert cfg.param_dtype == "bfloat16"  # dtypes are stored by name
  graphdef, params = llama.init_params(cfg, seed=1)
  assert "lm_head" not in params
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  assert _leaf_count(params) == cfg.num_params()
  logits = _forward(graphdef, params, _tokens(1, 4, cfg.vocab_size))
  assert logits.shape == (1, 4, cfg.vocab_size) and logits.dtype == jnp.float32


def test_param_tree_keys(small):
  _, params = small
  assert set(params) == {"embed", "blocks", "final_norm", "lm_head"}
  assert sorted(params["blocks"]) == [0, 1]
  block = params["blocks"][0]
  assert block["attn"]["q"]["kernel"].shape == (32, 32)
  assert block["attn"]["k"]["kernel"].shape == (32, 16)  # 2 kv heads of 8
  assert block["attn"]["o"]["kernel"].shape == (32, 32)
  assert block["mlp"]["down"]["kernel"].shape == (48, 32)
  assert block["attn_norm"]["scale"].shape == (32,)
  assert params["lm_head"]["kernel"].shape == (32, 64)


def test_config_is_frozen_hashable_and_validated():
  cfg = llama.CONFIGS["tiny"]
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.hidden_size = 1  # type: ignore[misc]
  assert hash(cfg) == hash(dataclasses.replace(cfg))
  json.dumps(dataclasses.asdict(cfg))
  assert llama.LlamaConfig(num_heads=4).num_kv_heads == 4
  with pytest.raises(ValueError, match="num_kv_heads"):
    dataclasses.replace(cfg, num_kv_heads=3)
  with pytest.raises(ValueError, match="num_heads"):
    dataclasses.replace(cfg, num_heads=5)
  with pytest.raises(ValueError, match="dtype"):
    dataclasses.replace(cfg, dtype="int32")
  with pytest.raises(ValueError, match="remat_policy"):
    dataclasses.replace(cfg, remat_policy="nope")
  with pytest.raises(ValueError, match="max_position_embeddings"):
    _forward(*llama.abstract_params(SMALL), _tokens(1, 33, 64))


# Causality and positions.


def test_changing_token_t_never_changes_earlier_logits(small):
  graphdef, params = small
  forward = _forward
  tokens = _tokens(2, 12, SMALL.vocab_size)
  base = np.asarray(forward(graphdef, params, tokens))
  for t in (0, 5, 11):
    changed = tokens.at[:, t].set((tokens[:, t] + 1) % SMALL.vocab_size)
    out = np.asarray(forward(graphdef, params, changed))
    np.testing.assert_allclose(out[:, :t], base[:, :t], rtol=0, atol=1e-6)
    assert np.abs(out[:, t:] - base[:, t:]).max() > 1e-4


def test_positions_default_to_arange_and_only_differences_matter(small):
  graphdef, params = small
  tokens = _tokens(2, 6, SMALL.vocab_size)
  positions = jnp.broadcast_to(jnp.arange(6), (2, 6))
  base = _forward(graphdef, params, tokens)
  np.testing.assert_array_equal(base, _forward(graphdef, params, tokens, positions))
  # RoPE is relative: shifting every position leaves the logits unchanged...
  shifted = _forward(graphdef, params, tokens, positions + 17)
  np.testing.assert_allclose(shifted, base, rtol=1e-5, atol=1e-5)
  # ...while spreading the positions apart does not.
  spread = _forward(graphdef, params, tokens, positions * 5)
  assert np.abs(np.asarray(spread) - np.asarray(base)).max() > 1e-4


# Presets, counts, FLOPs.


PAPER_SHAPES = {  # name: (hidden, ffn, heads, layers, max positions), from the GaLore paper
    "60m": (512, 1376, 8, 8, 1024),
    "130m": (768, 2048, 12, 12, 1024),
    "350m": (1024, 2736, 16, 24, 1024),
    "1b": (2048, 5461, 32, 24, 1024),
    "7b": (4096, 11008, 32, 32, 2048),
    "tiny": (256, 688, 4, 4, 512),
}


@pytest.mark.parametrize("name", list(PAPER_SHAPES))
def test_presets_shapes_and_parameter_counts(name):
  cfg = llama.CONFIGS[name]
  hidden, ffn, heads, num_layers, max_pos = PAPER_SHAPES[name]
  assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads, cfg.num_layers) == (
      hidden, ffn, heads, num_layers)
  assert (cfg.vocab_size, cfg.num_kv_heads, cfg.max_position_embeddings) == (32000, heads, max_pos)
  assert (cfg.tie_word_embeddings, cfg.rms_norm_eps) == (False, 1e-6)
  _, abstract = llama.abstract_params(cfg)  # nnx.eval_shape: no allocation, even for 7b
  assert all(isinstance(p, jax.ShapeDtypeStruct) for p in jax.tree.leaves(abstract))
  assert _leaf_count(abstract) == cfg.num_params()
  # Independent count: 4 d^2 attention + 3 d ffn MLP + 2 norms per block; embed, head, final norm.
  assert cfg.num_params() == num_layers * (4 * hidden**2 + 3 * hidden * ffn + 2 * hidden) + (
      2 * 32000 * hidden + hidden)


def test_known_parameter_count_of_7b():
  assert llama.CONFIGS["7b"].num_params() == 6_738_415_616  # LLaMA-7B's published count


def test_flops_per_token_formula():
  cfg = llama.CONFIGS["60m"]
  d, f, n_layers, vocab, seq = 512, 1376, 8, 32000, 256
  matmul = n_layers * (4 * d * d + 3 * d * f) + d * vocab
  assert cfg.num_matmul_params() == matmul
  assert cfg.flops_per_token(seq) == 6 * matmul + 12 * n_layers * d * seq
  tied = dataclasses.replace(cfg, tie_word_embeddings=True)
  assert tied.flops_per_token(seq) == cfg.flops_per_token(seq)


# Functional API.


def test_split_apply_init_are_consistent(small):
  graphdef, params = small
  model = llama.Llama(SMALL, rngs=nnx.Rngs(0))
  tokens = _tokens(2, 5, SMALL.vocab_size)
  np.testing.assert_array_equal(model(tokens), llama.apply(graphdef, params, tokens))
  abstract_graphdef, abstract = llama.abstract_params(SMALL)
  assert jax.tree.structure(abstract) == jax.tree.structure(params)
  jitted = jax.jit(llama.apply)  # graphdef as a (leafless) pytree argument
  np.testing.assert_allclose(jitted(abstract_graphdef, params, tokens),
                             model(tokens), rtol=1e-6, atol=1e-6)


def test_remat_gives_the_same_gradients(small):
  graphdef, params = small
  remat_cfg = dataclasses.replace(SMALL, remat=True,
                                  remat_policy="dots_with_no_batch_dims_saveable")
  remat_graphdef, _ = llama.abstract_params(remat_cfg)
  tokens = _tokens(2, 6, SMALL.vocab_size)

  def loss(params, graphdef):
    return jnp.mean(llama.apply(graphdef, params, tokens) ** 2)

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  plain, remat = grad(params, graphdef), grad(params, remat_graphdef)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), plain, remat)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss), static_argnums=1)(params, remat_graphdef))
  assert "checkpoint" in jaxpr or "remat" in jaxpr


# GaLore labels.


def test_galore_mask_and_labels(small):
  _, params = small
  mask, labels = llama.galore_mask(params), llama.galore_labels(params)
  flat = {jax.tree_util.keystr(path): leaf
          for path, leaf in jax.tree_util.tree_leaves_with_path(mask)}
  projected = {k for k, v in flat.items() if v}
  assert len(projected) == 7 * SMALL.num_layers
  for name in ("q", "k", "v", "o"):
    assert flat[f"['blocks'][1]['attn']['{name}']['kernel']"]
  for name in ("gate", "up", "down"):
    assert flat[f"['blocks'][0]['mlp']['{name}']['kernel']"]
  for key in ("['embed']['embedding']", "['lm_head']['kernel']", "['final_norm']['scale']",
              "['blocks'][0]['attn_norm']['scale']", "['blocks'][0]['mlp_norm']['scale']"):
    assert not flat[key]
  assert jax.tree.map(lambda m: "galore" if m else "adamw", mask) == labels


def test_labels_drive_optax_partition_and_masked(small):
  _, params = small
  grads = jax.tree.map(jnp.ones_like, params)
  tx = optax.partition({"galore": optax.scale(2.0), "adamw": optax.scale(-1.0)},
                       llama.galore_labels)
  updates, _ = tx.update(grads, tx.init(params), params)
  assert float(updates["blocks"][0]["attn"]["q"]["kernel"][0, 0]) == 2.0
  assert float(updates["embed"]["embedding"][0, 0]) == -1.0
  masked = optax.masked(optax.scale(0.0), llama.galore_mask)  # callable mask
  updates, _ = masked.update(grads, masked.init(params), params)
  assert float(updates["blocks"][0]["mlp"]["up"]["kernel"].sum()) == 0.0
  assert float(updates["final_norm"]["scale"][0]) == 1.0


# Sharding.


def test_partition_specs_by_strategy(small):
  _, params = small
  q = ("blocks", 0, "attn", "q", "kernel")
  down = ("blocks", 1, "mlp", "down", "kernel")

  def get(tree, path):
    for key in path:
      tree = tree[key]
    return tree

  expected = {
      "dp": (P(None, None), P(None, None), P(None, None), P(None)),
      "fsdp": (P("fsdp", None), P(None, "fsdp"), P(None, "fsdp"), P(None)),
      "tp": (P(None, "tensor"), P("tensor", None), P("tensor", None), P(None)),
      "fsdp_tp": (P("fsdp", "tensor"), P("tensor", "fsdp"), P("tensor", "fsdp"), P(None)),
  }
  for strategy, (q_spec, down_spec, embed_spec, norm_spec) in expected.items():
    specs = llama.partition_specs(params, strategy)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == (
        jax.tree.structure(params))
    assert get(specs, q) == q_spec
    assert get(specs, down) == down_spec
    assert specs["embed"]["embedding"] == embed_spec
    assert specs["final_norm"]["scale"] == norm_spec
  custom = llama.partition_specs(params, "fsdp_tp", fsdp_axis="x", tensor_axis="y")
  assert get(custom, q) == P("x", "y")
  assert llama.batch_spec("fsdp") == P(("data", "fsdp"), None)
  assert llama.batch_spec("tp", data_axis="d") == P("d", None)
  with pytest.raises(ValueError, match="strategy"):
    llama.partition_specs(params, "zero3")


def test_partition_specs_fit_the_mesh():
  _, abstract = llama.abstract_params(llama.CONFIGS["1b"])
  mesh = jax.make_mesh((1, 2, 4), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
  specs = llama.partition_specs(abstract, "fsdp_tp", mesh=mesh)
  # ffn 5461 is not divisible by 4: that dimension falls back to replication.
  assert specs["blocks"][0]["mlp"]["up"]["kernel"] == P("fsdp", None)
  assert specs["blocks"][0]["attn"]["q"]["kernel"] == P("fsdp", "tensor")
  only_fsdp = jax.make_mesh((8,), ("fsdp",), axis_types=(AxisType.Auto,))
  assert llama.batch_spec("fsdp", mesh=only_fsdp) == P("fsdp", None)


@pytest.mark.parametrize("axis_type", [AxisType.Auto, AxisType.Explicit])
@pytest.mark.parametrize("strategy", ["dp", "fsdp_tp"])
def test_sharded_forward_matches_unsharded(small, strategy, axis_type):
  graphdef, params = small
  mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(axis_type,) * 3)
  specs = llama.partition_specs(params, strategy, mesh=mesh)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  tokens = _tokens(8, 6, SMALL.vocab_size)
  sharded_tokens = jax.device_put(tokens, NamedSharding(mesh, llama.batch_spec(strategy)))
  out = jax.jit(llama.apply, static_argnums=0)(graphdef, sharded, sharded_tokens)
  np.testing.assert_allclose(out, _forward(graphdef, params, tokens), rtol=1e-5, atol=1e-5)
  if strategy == "fsdp_tp":
    assert sharded["blocks"][0]["attn"]["q"]["kernel"].sharding.spec == P("fsdp", "tensor")
  if axis_type == AxisType.Explicit and strategy == "fsdp_tp":
    # Weights are gathered on use; their gradients come back in the parameters' layout.
    grads = jax.jit(jax.grad(lambda p: _forward(graphdef, p, sharded_tokens).mean()))(sharded)
    jax.tree.map(lambda g, s: np.testing.assert_equal(g.sharding.spec, s), grads, specs,
                 is_leaf=lambda x: isinstance(x, P))


# Training.


def test_tiny_model_trains_on_a_fixed_batch():
  cfg = llama.CONFIGS["tiny"]
  graphdef, params = llama.init_params(cfg, seed=0)
  batch = _tokens(4, 33, cfg.vocab_size, seed=1)
  inputs, targets = batch[:, :-1], batch[:, 1:]
  tx = optax.adam(3e-3)

  def loss_fn(params):
    logits = llama.apply(graphdef, params, inputs)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

  @jax.jit
  def step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for _ in range(6):
    params, opt_state, loss = step(params, opt_state)
    losses.append(float(loss))
  assert abs(losses[0] - math.log(cfg.vocab_size)) < 0.5  # starts near uniform
  assert losses[-1] < losses[0] - 1.0, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
