"""ng.scale_by_adam_8bit: bitsandbytes' Adam8bit scheme in optax, and 8-bit (Natural) GaLore."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import ngalore_jax as ng
from ngalore_jax import _adam8bit

# Test-only reference (dev extras); its CPU kernels run without a GPU.
torch = pytest.importorskip("torch", reason="the bitsandbytes references need torch (CPU)")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
  """bitsandbytes' CPU kernels under torch's thread pool spin-wait on a busy machine (75 ms a
  step instead of 2)."""
  threads = torch.get_num_threads()
  torch.set_num_threads(1)
  yield
  torch.set_num_threads(threads)


def _bnb():
  return pytest.importorskip(
      "bitsandbytes", reason="bitsandbytes==0.50.2 (dev extra) is the test-only reference; "
      "the NumPy reference tests below cover the scheme without it")


# ---------------------------------------------------------------- NumPy reference (no bnb)


def _np_quantize(x, code, block_size):
  """Blockwise absmax + nearest map value by brute force (ties to the lower code)."""
  flat = x.reshape(-1).astype(np.float32)
  blocks = -(-flat.size // block_size)
  padded = np.zeros(blocks * block_size, np.float32)
  padded[:flat.size] = flat
  padded = padded.reshape(blocks, block_size)
  absmax = np.abs(padded).max(axis=1)
  normed = padded / np.where(absmax > 0, absmax, 1.0)[:, None]
  codes = np.abs(normed[..., None] - code).argmin(-1).astype(np.uint8)
  return codes, absmax


def _np_dequantize(codes, absmax, code, shape):
  return (code[codes] * absmax[:, None]).reshape(-1)[:math.prod(shape)].reshape(shape)


def _np_adam8bit(p, grads, lr, b1, b2, eps, block_size, min_8bit_size):
  """Reference 8-bit Adam in NumPy: dequantise, Adam in float32, step, requantise."""
  signed, unsigned = _adam8bit.dynamic_map(True), _adam8bit.dynamic_map(False)
  p = p.astype(np.float32).copy()
  quantised = p.size >= min_8bit_size
  m = np.zeros_like(p)
  v = np.zeros_like(p)
  qm = qv = None
  for t, g in enumerate(grads, start=1):
    if quantised and qm is not None:
      m = _np_dequantize(*qm, signed, p.shape)
      v = _np_dequantize(*qv, unsigned, p.shape)
    m = np.float32(b1) * m + np.float32(1 - b1) * g
    v = np.float32(b2) * v + np.float32(1 - b2) * g * g
    u = (m / np.float32(1 - b1**t)) / (np.sqrt(v / np.float32(1 - b2**t)) + np.float32(eps))
    p = p - np.float32(lr) * u
    if quantised:
      qm = _np_quantize(m, signed, block_size)
      qv = _np_quantize(v, unsigned, block_size)
  return p


def _run_optax(tx, params, grads):
  state = tx.init(params)

  @jax.jit
  def step(params, state, g):
    updates, state = tx.update(g, state, params)
    return optax.apply_updates(params, updates), state

  for g in grads:
    params, state = step(params, state, g)
  return params, state


def test_quantise_round_trip_is_the_nearest_code_numpy_reference():
  rng = np.random.default_rng(0)
  x = (rng.standard_normal(3 * 100 + 7) * np.exp(rng.standard_normal(307))).astype(np.float32)
  for signed, values in ((True, x), (False, np.abs(x))):
    codes, absmax = _adam8bit.quantize_blockwise(_adam8bit.to_blocks(jnp.asarray(values), 100),
                                                 signed=signed)
    code = _adam8bit.dynamic_map(signed)
    ref_codes, ref_absmax = _np_quantize(values, code, 100)
    assert codes.shape == (4, 100) and codes.dtype == jnp.uint8  # last block partial, padded
    np.testing.assert_array_equal(np.asarray(absmax), ref_absmax)
    np.testing.assert_array_equal(np.asarray(codes), ref_codes)
    back = _adam8bit.from_blocks(_adam8bit.dequantize_blockwise(codes, absmax, signed=signed),
                                 values.shape)
    np.testing.assert_array_equal(np.asarray(back), _np_dequantize(ref_codes, ref_absmax, code,
                                                                   values.shape))
  # An all-zero block: scale 0, dequantised to exact zeros.
  codes, absmax = _adam8bit.quantize_blockwise(jnp.zeros((2, 8)))
  assert float(jnp.max(absmax)) == 0.0
  assert not jnp.any(_adam8bit.dequantize_blockwise(codes, absmax))


def test_adam_8bit_matches_numpy_reference_any_block_size():
  rng = np.random.default_rng(1)
  shape = (30, 50)  # 1500 elements: 15 blocks of 100, 3 of 512 (the last partial)
  p0 = rng.standard_normal(shape).astype(np.float32)
  grads = [rng.standard_normal(shape).astype(np.float32) for _ in range(8)]
  for block_size in (100, 512):
    tx = optax.chain(ng.scale_by_adam_8bit(block_size=block_size, min_8bit_size=1000),
                     optax.scale_by_learning_rate(1e-2))
    params, state = _run_optax(tx, jnp.asarray(p0), [jnp.asarray(g) for g in grads])
    assert state[0].mu.dtype == jnp.uint8
    assert state[0].mu.shape == (-(-1500 // block_size), block_size)
    ref = _np_adam8bit(p0, grads, 1e-2, 0.9, 0.999, 1e-8, block_size, 1000)
    moved = np.linalg.norm(ref - p0)
    assert np.linalg.norm(np.asarray(params) - ref) / moved < 1e-4


# ---------------------------------------------------------------- bitsandbytes reference


def test_dynamic_map_equals_bitsandbytes():
  bnb = _bnb()
  for signed in (True, False):
    ref = bnb.functional.create_dynamic_map(signed=signed).numpy()
    np.testing.assert_array_equal(_adam8bit.dynamic_map(signed=signed), ref)


def test_blockwise_round_trip_against_bitsandbytes():
  bnb = _bnb()
  F = bnb.functional
  rng = np.random.default_rng(2)
  n = 256 * 24 + 77  # a partial last block
  for signed in (True, False):
    x = rng.standard_normal(n).astype(np.float32) * 1e-3
    if not signed:
      x = x * x
    code = F.create_dynamic_map(signed=signed)
    q, qstate = F.quantize_blockwise(torch.from_numpy(x), code=code, blocksize=256)
    ref_back = F.dequantize_blockwise(q, qstate).numpy()
    codes, absmax = _adam8bit.quantize_blockwise(_adam8bit.to_blocks(jnp.asarray(x), 256),
                                                 signed=signed)
    # Same blocks and scales.
    np.testing.assert_array_equal(np.asarray(absmax), qstate.absmax.numpy())
    # Same dequantisation: ng's reading of bitsandbytes' codes is bitsandbytes' own.
    theirs = _adam8bit.to_blocks(jnp.asarray(q.numpy()), 256)
    np.testing.assert_array_equal(
        np.asarray(_adam8bit.from_blocks(
            _adam8bit.dequantize_blockwise(theirs, absmax, signed=signed), (n,))), ref_back)
    # The codes: ng picks the exact nearest map value (as the NumPy reference above checks);
    # bitsandbytes' CPU kernel (cquantize_blockwise_cpu_fp32, a BinSearch lookup table) picks a
    # neighbour of it on ~0.2% of the values, and resolves values below ~1e-3 of the block's
    # absmax more coarsely (several codes apart in the unsigned map's smallest decades).
    ours = np.asarray(_adam8bit.from_blocks(codes, (n,))).astype(int)
    theirs = q.numpy().astype(int)
    scale = np.repeat(qstate.absmax.numpy(), 256)[:n]
    resolved = np.abs(x) / scale > 1e-3
    assert np.mean(ours == theirs) > 0.95
    assert np.mean((ours == theirs)[resolved]) > 0.99
    assert np.max(np.abs(ours - theirs)[resolved]) <= 1
    back = np.asarray(_adam8bit.from_blocks(
        _adam8bit.dequantize_blockwise(codes, absmax, signed=signed), (n,)))
    assert np.max(np.abs(back - ref_back) / scale) < 0.02


def test_fifty_steps_match_bitsandbytes_adam8bit():
  bnb = _bnb()
  rng = np.random.default_rng(3)
  # 32768 and 6400 elements (>= 4096, 8-bit; 6400 ends in a partial block); 100 stays 32-bit.
  shapes = {"big": (128, 256), "odd": (64, 100), "small": (100,)}
  p0 = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  lr, steps = 1e-3, 50
  grads = [{k: (rng.standard_normal(s) * (0.1 + rng.random(s))).astype(np.float32)
            for k, s in shapes.items()} for _ in range(steps)]

  torch_params = {k: torch.nn.Parameter(torch.from_numpy(v.copy())) for k, v in p0.items()}
  opt = bnb.optim.Adam8bit(list(torch_params.values()), lr=lr, betas=(0.9, 0.999), eps=1e-8)
  for g in grads:
    for k, p in torch_params.items():
      p.grad = torch.from_numpy(g[k])
    opt.step()
  assert opt.state[torch_params["big"]]["state1"].dtype == torch.uint8
  assert opt.state[torch_params["small"]]["state1"].dtype == torch.float32

  tx = optax.chain(ng.scale_by_adam_8bit(), optax.scale_by_learning_rate(lr))
  params, state = _run_optax(tx, {k: jnp.asarray(v) for k, v in p0.items()},
                             [{k: jnp.asarray(v) for k, v in g.items()} for g in grads])
  assert state[0].mu["big"].dtype == jnp.uint8 and state[0].nu["odd"].dtype == jnp.uint8
  assert state[0].mu["small"].dtype == jnp.float32
  adam32, _ = _run_optax(optax.adam(lr), {k: jnp.asarray(v) for k, v in p0.items()},
                         [{k: jnp.asarray(v) for k, v in g.items()} for g in grads])
  for k in shapes:
    theirs = torch_params[k].detach().numpy() - p0[k]
    ours = np.asarray(params[k]) - p0[k]
    relative = np.linalg.norm(ours - theirs) / np.linalg.norm(theirs)
    assert relative < 1e-2, (k, relative)
    if k != "small":  # the check can tell 8-bit from float32 Adam
      float32 = np.asarray(adam32[k]) - p0[k]
      assert np.linalg.norm(float32 - theirs) / np.linalg.norm(theirs) > 1e-2


# ---------------------------------------------------------------- GaLore / Natural GaLore


def _matrix_params():
  rng = np.random.default_rng(4)
  # "w": coefficients 32 x 128 = 4096 (reverse_std): 8-bit; "emb" unprojected (mask): 8-bit;
  # "b": 128 elements: float32 moments.
  return {"w": jnp.asarray(rng.standard_normal((256, 128)), jnp.float32),
          "emb": jnp.asarray(rng.standard_normal((64, 96)), jnp.float32),
          "b": jnp.zeros((128,), jnp.float32)}


def _mask(params):
  return {"w": True, "emb": False, "b": False}


def _grads(params, steps, seed=5):
  rng = np.random.default_rng(seed)
  # Low-rank-ish gradients plus noise, so the subspace means something.
  out = []
  for _ in range(steps):
    grads = {}
    for k, p in params.items():
      g = rng.standard_normal(p.shape) * 0.1
      if p.ndim == 2:
        g = g + np.outer(rng.standard_normal(p.shape[0]), rng.standard_normal(p.shape[1]))
      grads[k] = jnp.asarray(g, jnp.float32)
    out.append(grads)
  return out


@pytest.mark.parametrize("alias", ["galore", "natural_galore"])
def test_eight_bit_galore_runs_and_tracks_float32(alias):
  params = _matrix_params()
  options = dict(rank=32, update_proj_gap=5, mask=_mask)  # rotations at steps 6, 11, 16
  if alias == "natural_galore":
    options["history_dtype"] = jnp.int8
  make = getattr(ng, alias)
  grads = _grads(params, 20)
  p8, s8 = _run_optax(make(1e-2, adam_8bit=True, **options), params, grads)
  p32, _ = _run_optax(make(1e-2, **options), params, grads)

  inner = s8[0].inner_states["galore"].inner_state.inner_states["w"]
  adam = inner if alias == "galore" else inner[1]
  assert isinstance(adam, ng.ScaleByAdam8bitState)
  assert adam.mu.dtype == jnp.uint8 and adam.nu.dtype == jnp.uint8
  if alias == "natural_galore":
    assert inner[0].history.dtype == jnp.int8
  rest = s8[0].inner_states["adam"].inner_state
  assert rest.mu["emb"].dtype == jnp.uint8 and rest.mu["b"].dtype == jnp.float32
  for k in params:
    moved8 = np.asarray(p8[k] - params[k])
    moved32 = np.asarray(p32[k] - params[k])
    assert np.all(np.isfinite(moved8))
    if np.linalg.norm(moved32):
      relative = np.linalg.norm(moved8 - moved32) / np.linalg.norm(moved32)
      assert relative < 0.05, (alias, k, relative)  # measured: 0.017-0.02


def test_rotate_rule_is_adams_on_the_dequantised_moments():
  rng = np.random.default_rng(6)
  coefficients = jnp.asarray(rng.standard_normal((32, 128)), jnp.float32)
  tx8 = ng.scale_by_adam_8bit()
  s8 = tx8.update(coefficients, tx8.init(coefficients))[1]
  s8 = tx8.update(coefficients * 0.5 + 1.0, s8)[1]

  class Plan:  # the part of a projection plan a rule uses: left rotation of 32 x 128

    def coefficient_shape(self):
      return (32, 128)

    def rotate(self, x, rotation, squared=False):
      r = rotation * rotation if squared else rotation
      return (r @ x.astype(jnp.float32)).astype(x.dtype)

  rotation, _ = jnp.linalg.qr(jnp.asarray(rng.standard_normal((32, 32)), jnp.float32))
  deq = lambda q, a, signed: _adam8bit.from_blocks(
      _adam8bit.dequantize_blockwise(q, a, signed=signed), (32, 128))
  mu, nu = deq(s8.mu, s8.mu_absmax, True), deq(s8.nu, s8.nu_absmax, False)
  rotated = _adam8bit.rotate_state(s8, Plan(), rotation)
  assert rotated.mu.dtype == jnp.uint8 and rotated.count == s8.count
  for got, want, signed in ((deq(rotated.mu, rotated.mu_absmax, True), rotation @ mu, True),
                            (deq(rotated.nu, rotated.nu_absmax, False),
                             (rotation * rotation) @ nu, False)):
    assert float(jnp.min(got)) >= 0.0 or signed
    error = jnp.linalg.norm(got - want) / jnp.linalg.norm(want)
    assert error < 0.05


# ---------------------------------------------------------------- bad input, non-finite


@pytest.mark.parametrize("kwargs, name", [
    (dict(b1=1.0), "b1"), (dict(b1=-0.1), "b1"), (dict(b2=1.0), "b2"),
    (dict(b2=float("nan")), "b2"), (dict(eps=-1e-8), "eps"), (dict(block_size=0), "block_size"),
    (dict(block_size=2.5), "block_size"), (dict(min_8bit_size=-1), "min_8bit_size"),
])
def test_bad_arguments_name_themselves(kwargs, name):
  with pytest.raises(ValueError, match=f"`{name}`"):
    ng.scale_by_adam_8bit(**kwargs)


def test_mu_dtype_with_adam_8bit_is_an_error():
  with pytest.raises(ValueError, match="`mu_dtype`"):
    ng.galore(1e-3, adam_8bit=True, mu_dtype=jnp.bfloat16)


def test_apply_if_finite_keeps_the_8bit_state():
  params = {"w": jnp.ones((64, 128))}
  tx = optax.apply_if_finite(ng.scale_by_adam_8bit(), max_consecutive_errors=3)
  state = tx.init(params)
  update = jax.jit(tx.update)
  _, state = update({"w": jnp.full((64, 128), 0.3)}, state, params)
  bad = {"w": jnp.full((64, 128), 0.3).at[3, 7].set(jnp.nan)}
  updates, after = update(bad, state, params)
  assert not jnp.any(updates["w"])
  assert int(after.notfinite_count) == 1
  for before_leaf, after_leaf in zip(jax.tree.leaves(state.inner_state),
                                     jax.tree.leaves(after.inner_state)):
    assert before_leaf.dtype == after_leaf.dtype
    np.testing.assert_array_equal(np.asarray(before_leaf), np.asarray(after_leaf))
  assert after.inner_state.mu["w"].dtype == jnp.uint8


def test_checkpoint_of_an_8bit_run_refuses_a_float32_run(tmp_path):
  # pylint: disable-next=import-outside-toplevel
  from train import checkpointing, config as config_lib, optimizers, resume
  params = {"blocks": {0: {"mlp": {"up": {"kernel": jnp.ones((128, 256))}}}}}
  abstract_params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
  saved = config_lib.TrainConfig(optimizer=optimizers.make("galore", rank=32, adam_8bit=1))
  current = config_lib.TrainConfig(optimizer=optimizers.make("galore", rank=32))

  def opt_state(config):
    tx = optimizers.build_optimizer(config, optimizers.learning_rate_schedule(config))
    return tx.init(params)

  ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"), async_save=False)
  try:
    ckpt.save(1, {"opt_state": opt_state(saved)}, {"step": 1, "config": saved.to_dict()})
    ckpt.wait()
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device),
                            {"opt_state": opt_state(current)})
    check = lambda meta: resume.check_resumable(meta["config"], current, str(tmp_path),
                                                abstract_params)
    with pytest.raises(config_lib.ConfigError) as info:
      ckpt.restore_newest(abstract, check=check)
    message = str(info.value)
    assert "\n" not in message and "--adam-8bit 1 (now None)" in message
    # Without the configuration check, orbax's own structure mismatch, on one line too.
    with pytest.raises(checkpointing.CheckpointError, match="tree structures do not match"):
      ckpt.restore(1, abstract)
  finally:
    ckpt.close()


# ---------------------------------------------------------------- memory and sharding


def test_state_bytes_are_a_quarter_of_adams():
  shape = (1024, 1000)  # 1,024,000 elements: 4000 blocks of 256
  params = {"w": jax.ShapeDtypeStruct(shape, jnp.float32)}
  n = math.prod(shape)
  blocks = -(-n // 256)
  eight = ng.optimizer_state_bytes(jax.eval_shape(ng.scale_by_adam_8bit().init, params))
  full = ng.optimizer_state_bytes(jax.eval_shape(optax.scale_by_adam().init, params))
  # count + two moments of uint8 codes (padded to whole blocks) + two float32 scales per block.
  assert eight["total"] == 4 + 2 * blocks * 256 + 2 * 4 * blocks
  assert full["total"] == 4 + 2 * 4 * n
  assert 0.25 <= eight["total"] / full["total"] < 0.26


def test_state_shardings_replicate_the_8bit_state():
  mesh = jax.make_mesh((2,), ("fsdp",))
  spec = NamedSharding(mesh, P("fsdp", None))
  params = {"w": jax.ShapeDtypeStruct((256, 128), jnp.float32, sharding=spec),
            "emb": jax.ShapeDtypeStruct((64, 96), jnp.float32, sharding=spec)}
  tx = ng.galore(1e-3, rank=32, adam_8bit=True, mask={"w": True, "emb": False})
  shardings = ng.state_shardings(tx, params)
  state = jax.eval_shape(tx.init, params)
  assert jax.tree.structure(shardings) == jax.tree.structure(state)
  rest = shardings[0].inner_states["adam"].inner_state
  replicated = lambda sharding: all(axis is None for axis in sharding.spec)
  assert replicated(rest.mu["emb"]) and replicated(rest.mu_absmax["emb"])
  inner = shardings[0].inner_states["galore"].inner_state.inner_states["w"]
  assert replicated(inner.mu) and replicated(inner.nu_absmax)


def test_update_under_an_explicit_mesh_keeps_the_gradients_sharding():
  mesh = jax.make_mesh((2,), ("fsdp",), axis_types=(jax.sharding.AxisType.Explicit,))
  specs = {"w": P("fsdp", None), "b": P("fsdp")}
  tx = ng.scale_by_adam_8bit()
  with jax.set_mesh(mesh):
    grads = {"w": jnp.ones((256, 128)), "b": jnp.ones((128,))}
    grads = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in grads.items()}
    state = jax.jit(tx.init)(grads)
    updates, state = jax.jit(tx.update)(grads, state)
  assert state.mu["w"].dtype == jnp.uint8 and state.mu["b"].dtype == jnp.float32
  for k, spec in specs.items():
    assert updates[k].sharding.spec == spec
    np.testing.assert_allclose(np.asarray(updates[k]), 1.0, rtol=1e-5)  # step 1: sign(g)


def test_trainer_flags_and_adamw_8bit():
  from train import config as config_lib, optimizers  # pylint: disable=import-outside-toplevel
  config = config_lib.from_argv(["--optimizer", "natural_galore", "--adam-8bit", "1",
                                 "--rank", "32"])
  assert config.optimizer.adam_8bit == 1
  params = {"blocks": {0: {"mlp": {"up": {"kernel": jnp.ones((128, 256))}}}},
            "norm": {"scale": jnp.ones((128,))}}
  state = config.optimizer.build(1e-3).init(params)
  assert any(isinstance(x, ng.ScaleByAdam8bitState)
             for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
                 x, ng.ScaleByAdam8bitState)))
  with pytest.raises(SystemExit):
    config_lib.from_argv(["--optimizer", "galore", "--adam-8bit", "2"])

  tx = optimizers.make("adamw_8bit", weight_decay=0.1).build(1e-3)
  big = {"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}
  state = tx.init(big)
  assert state[0].mu["w"].dtype == jnp.uint8 and state[0].mu["b"].dtype == jnp.float32
  updates, _ = jax.jit(tx.update)({"w": jnp.ones((64, 128)), "b": jnp.ones((128,))}, state, big)
  # Adam's first step is lr * sign(g); decay only on the matrix: lr * (1 + 0.1 * 1).
  np.testing.assert_allclose(np.asarray(updates["w"]), -1e-3 * 1.1, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(updates["b"]), -1e-3, rtol=1e-4)
