"""kronecker_precondition against a float64 NumPy reference of the one-sided Kronecker factor."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng


def matrix_power(matrix, damping, exponent, relative):
  """(lam I + M)^p of a symmetric PSD stack ``(..., d, d)`` (float64)."""
  eigenvalues, eigenvectors = np.linalg.eigh(matrix)
  eigenvalues = np.maximum(eigenvalues, 0.0)
  lam = damping * eigenvalues[..., -1:] if relative else damping
  return np.einsum("...ij,...j,...kj->...ik", eigenvectors, (lam + eigenvalues) ** exponent,
                   eigenvectors)


class Reference:
  """The EMA L = beta L + (1 - beta) C C^T over one side, bias-corrected, in float64."""

  def __init__(self, side, beta=0.95, damping=1e-3, exponent=-0.5, relative=True,
               root_every=1):
    self.side, self.beta, self.damping = side, beta, damping
    self.exponent, self.relative, self.root_every = exponent, relative, root_every
    self.factor, self.count, self.root = None, 0, None

  def as_rows(self, c):
    c = np.asarray(c, np.float64)
    return np.swapaxes(c, -1, -2) if self.side == "cols" else c

  def step(self, c):
    c = self.as_rows(c)
    outer = np.einsum("...ik,...jk->...ij", c, c)
    self.factor = (1 - self.beta) * outer + (0 if self.factor is None else
                                             self.beta * self.factor)
    if self.root is None or self.count % self.root_every == 0:
      corrected = self.factor / (1 - self.beta ** (self.count + 1))
      self.root = matrix_power(corrected, self.damping, self.exponent, self.relative)
    self.count += 1
    out = self.root @ c
    return np.swapaxes(out, -1, -2) if self.side == "cols" else out

  def rotate(self, rotation):
    """L -> R L R^T; the cached root is recomputed on the next step."""
    self.factor = rotation @ self.factor @ rotation.T
    self.root = None

  def reset(self):
    self.factor, self.count, self.root = None, 0, None


def random_grads(shape, steps, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [(scale * rng.normal(size=shape)).astype(np.float32) for _ in range(steps)]


def run(tx, grads):
  state = tx.init(jnp.zeros(grads[0].shape, grads[0].dtype))
  step = jax.jit(tx.update)
  outs, states = [], []
  for g in grads:
    update, state = step(jnp.asarray(g), state)
    outs.append(np.asarray(update, np.float64))
    states.append(state)
  return outs, states


def assert_close(got, want, rtol=2e-3, err_msg=""):
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.max(np.abs(want)),
                             err_msg=err_msg)


@pytest.mark.parametrize("shape,side", [((4, 9), "rows"), ((9, 4), "cols"), ((3, 5, 7), "rows"),
                                        ((2, 6, 3), "cols")])
@pytest.mark.parametrize("exponent,relative,damping", [(-0.5, True, 1e-3), (-1.0, True, 1e-2),
                                                       (-0.5, False, 0.1), (-1.0, False, 0.5)])
def test_matches_numpy_ema_reference(shape, side, exponent, relative, damping):
  grads = random_grads(shape, 8)
  tx = ng.kronecker_precondition(beta=0.9, damping=damping, exponent=exponent,
                                 damping_mode="relative" if relative else "absolute")
  outs, states = run(tx, grads)
  d = shape[-2] if side == "rows" else shape[-1]
  factor = getattr(states[-1], side)
  assert factor.shape == shape[:-2] + (d, d) and factor.dtype == jnp.float32
  assert getattr(states[-1], "cols" if side == "rows" else "rows") is None
  reference = Reference(side, beta=0.9, damping=damping, exponent=exponent, relative=relative)
  for t, (g, got) in enumerate(zip(grads, outs)):
    assert_close(got, reference.step(g), err_msg=f"step {t}")
  # The stored (normalised) factor times scale**2 is the EMA itself.
  stored = np.asarray(factor, np.float64) * np.asarray(states[-1].scale, np.float64)[
      ..., None, None] ** 2
  np.testing.assert_allclose(stored, reference.factor, rtol=1e-5,
                             atol=1e-6 * np.max(np.abs(reference.factor)))


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_forced_side_on_a_square_leaf(side):
  grads = random_grads((5, 5), 4, seed=1)
  outs, states = run(ng.kronecker_precondition(side=side, beta=0.5), grads)
  assert getattr(states[-1], side).shape == (5, 5)
  reference = Reference(side, beta=0.5)
  for g, got in zip(grads, outs):
    assert_close(got, reference.step(g))


def test_first_step_whitens_the_singular_values():
  # After one step L = C C^T (bias-corrected): singular values s -> s / sqrt(lam + s^2).
  c = random_grads((3, 8), 1, seed=2)[0].astype(np.float64)
  u, s, vt = np.linalg.svd(c, full_matrices=False)
  lam = 1e-3 * s[0] ** 2
  want = u @ np.diag(s / np.sqrt(lam + s ** 2)) @ vt
  (got,), _ = run(ng.kronecker_precondition(), [c.astype(np.float32)])
  assert_close(got, want, rtol=1e-4)


def test_cached_root_is_recomputed_every_k_steps():
  grads = random_grads((4, 7), 9, seed=3)
  tx = ng.kronecker_precondition(root_every=3, beta=0.8, exponent=-1.0, damping=1e-2)
  outs, states = run(tx, grads)
  assert states[-1].inverse_root.shape == (4, 4) and states[-1].root_scale.shape == ()
  reference = Reference("rows", beta=0.8, exponent=-1.0, damping=1e-2, root_every=3)
  for t, (g, got) in enumerate(zip(grads, outs)):
    assert_close(got, reference.step(g), err_msg=f"step {t}")
  # A stale root (power of a different EMA) really is used between refreshes.
  fresh = Reference("rows", beta=0.8, exponent=-1.0, damping=1e-2)
  fresh_outs = [fresh.step(g) for g in grads]
  assert np.max(np.abs(outs[1] - fresh_outs[1])) > 1e-3 * np.max(np.abs(fresh_outs[1]))


@pytest.mark.parametrize("root_every", [1, 4])
def test_memory_is_one_factor_per_matrix_and_does_not_grow(root_every):
  tx = ng.kronecker_precondition(root_every=root_every)
  per_matrix = 4 * (8 * 8 + 1) * (2 if root_every > 1 else 1)
  for n in (16, 1024):  # the factor is over the smaller side: 8 x 8 whatever n
    state = jax.eval_shape(tx.init, {"w": jnp.zeros((8, n)), "b": jnp.zeros((n,))})
    assert ng.optimizer_state_bytes(state)["curvature"] == per_matrix
  stacked = jax.eval_shape(tx.init, {"w": jnp.zeros((3, 8, 40))})
  assert ng.optimizer_state_bytes(stacked)["curvature"] == 3 * per_matrix
  # Steps change nothing about the shapes.
  params = {"w": jnp.zeros((8, 16))}
  state = tx.init(params)
  initial = jax.tree.map(lambda x: (x.shape, x.dtype), state)
  for g in random_grads((8, 16), 3, seed=4):
    _, state = tx.update({"w": jnp.asarray(g)}, state)
  assert jax.tree.map(lambda x: (x.shape, x.dtype), state) == initial
  # Inside the projection the factor is r x r: (64 x 32, std) has coefficients 64 x r.
  inner = optax.chain(ng.kronecker_precondition(root_every=root_every), optax.scale_by_adam())
  projected = jax.eval_shape(ng.galore_projection(inner, rank=6).init,
                             {"w": jnp.zeros((64, 32))})
  counts = ng.optimizer_state_bytes(projected)
  assert counts["curvature"] == 4 * (6 * 6 + 1) * (2 if root_every > 1 else 1)
  assert counts["inner_state"] == 2 * 64 * 6 * 4 + 2 * 4  # Adam's moments, two counters


@pytest.mark.parametrize("magnitude", [1e-30, 1e-10, 1e10, 1e30])
@pytest.mark.parametrize("exponent,relative", [(-0.5, True), (-1.0, True), (-0.5, False),
                                               (-1.0, False)])
def test_extreme_gradient_scales(magnitude, exponent, relative):
  grads = random_grads((4, 6), 5, seed=5, scale=magnitude)
  tx = ng.kronecker_precondition(exponent=exponent, beta=0.9,
                                 damping_mode="relative" if relative else "absolute")
  outs, _ = run(tx, grads)
  reference = Reference("rows", beta=0.9, exponent=exponent, relative=relative)
  for t, (g, got) in enumerate(zip(grads, outs)):
    want = reference.step(g)
    assert np.all(np.isfinite(got)) and np.all(np.isfinite(want))
    assert_close(got, want, err_msg=f"step {t}")


def test_zero_and_mixed_scale_gradients_stay_finite():
  rng = np.random.default_rng(6)
  base = rng.normal(size=(3, 5)).astype(np.float32)
  grads = [np.zeros_like(base), np.zeros_like(base), 1e30 * base, 1e-30 * base,
           np.zeros_like(base), 1e-30 * rng.normal(size=base.shape).astype(np.float32)]
  for kwargs in (dict(), dict(damping_mode="absolute", exponent=-1.0), dict(root_every=2)):
    outs, states = run(ng.kronecker_precondition(**kwargs), grads)
    np.testing.assert_array_equal(outs[0], 0.0)
    np.testing.assert_array_equal(outs[1], 0.0)
    np.testing.assert_array_equal(outs[4], 0.0)
    for out, state in zip(outs, states):
      assert np.all(np.isfinite(out))
      for leaf in jax.tree.leaves(state):
        assert np.all(np.isfinite(np.asarray(leaf)))
  # (The 1e-30 gradient right after a 1e30 one has a true update of about 1e-60, below
  # float32's range: finite and zero is the best float32 can do there.)


def test_other_shapes_pass_through_or_batch():
  rng = np.random.default_rng(7)
  grads = {"bias": rng.normal(size=(5,)).astype(np.float32),
           "scalar": np.float32(2.5),
           "empty": np.zeros((0, 4), np.float32),
           "core": rng.normal(size=(2, 3, 4)).astype(np.float32)}
  tx = ng.kronecker_precondition()
  state = tx.init(jax.tree.map(jnp.zeros_like, grads))
  for field in ("rows", "cols", "scale"):
    for name in ("bias", "scalar", "empty"):
      assert getattr(state, field)[name] is None
  assert state.rows["core"].shape == (2, 3, 3) and state.scale["core"].shape == (2,)
  updates, state = jax.jit(tx.update)(jax.tree.map(jnp.asarray, grads), state)
  for name in ("bias", "scalar", "empty"):
    np.testing.assert_array_equal(updates[name], grads[name])
    assert updates[name].shape == np.shape(grads[name])
  # Each matrix of the 3-D leaf separately.
  for i in range(2):
    want = Reference("rows").step(grads["core"][i])
    assert_close(np.asarray(updates["core"][i], np.float64), want)


def test_dtype_is_preserved():
  tx = ng.kronecker_precondition()
  state = tx.init(jnp.zeros((4, 6), jnp.bfloat16))
  assert state.rows.dtype == jnp.float32
  update, _ = tx.update(jnp.ones((4, 6), jnp.bfloat16), state)
  assert update.dtype == jnp.bfloat16


def expected_side(m, n):
  return "right" if m >= n else "left"  # proj_type="std"


@pytest.mark.parametrize("shape,factor_side", [((10, 6), "auto"), ((6, 10), "auto"),
                                               ((10, 6), "rows")])
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_inside_galore_projection_with_every_refresh_policy(shape, factor_side, policy):
  rank, gap, scale = 3, 3, 0.5
  m, n = shape
  plan_side = expected_side(m, n)
  grads = random_grads(shape, 8, seed=8)
  inner = ng.kronecker_precondition(beta=0.9, side=factor_side)
  tx = ng.galore_projection(inner, rank=rank, update_proj_gap=gap, scale=scale,
                            refresh_policy=policy)
  state = tx.init({"w": jnp.zeros(shape)})
  step = jax.jit(tx.update)
  # Coefficients: left r x n, right m x r. "auto" puts the factor on the rank side.
  coefficient_rows_is_rank = plan_side == "left"
  if factor_side == "auto":
    ref_side = "rows" if coefficient_rows_is_rank else "cols"
  else:
    ref_side = factor_side
  on_rank_side = (ref_side == "rows") == coefficient_rows_is_rank
  reference = Reference(ref_side, beta=0.9)
  basis = None
  for t, g in enumerate(grads):
    updates, state = step({"w": jnp.asarray(g)}, state)
    new_basis = np.asarray(state.projectors["w"][0], np.float64)
    if t % gap == 0 and basis is not None:
      if policy == "reset":
        reference.reset()
      elif policy == "rotate" and on_rank_side:
        reference.rotate(new_basis.T @ basis)
    basis = new_basis
    g64 = g.astype(np.float64)
    coefficients = basis.T @ g64 if plan_side == "left" else g64 @ basis
    low_rank = reference.step(coefficients)
    want = scale * (basis @ low_rank if plan_side == "left" else low_rank @ basis.T)
    assert_close(np.asarray(updates["w"], np.float64), want, err_msg=f"step {t}")
  factor = getattr(state.inner_states["w"], ref_side)
  assert factor.shape == ((rank, rank) if on_rank_side else (m, m))


def test_rotate_marks_the_cached_root_stale_and_keeps_tucker_cores():
  grads = random_grads((9, 5), 5, seed=9)
  inner = ng.kronecker_precondition(root_every=10, beta=0.9)
  tx = ng.galore_projection(inner, rank=2, update_proj_gap=2, scale=1.0, refresh_policy="rotate")
  state = tx.init({"w": jnp.zeros((9, 5))})
  reference = Reference("cols", beta=0.9, root_every=10)
  basis = None
  for t, g in enumerate(grads):
    updates, state = tx.update({"w": jnp.asarray(g)}, state)
    new_basis = np.asarray(state.projectors["w"][0], np.float64)
    if t % 2 == 0 and basis is not None:
      reference.rotate(new_basis.T @ basis)  # and the root is recomputed at once
    basis = new_basis
    want = reference.step(g.astype(np.float64) @ basis) @ basis.T
    assert_close(np.asarray(updates["w"], np.float64), want, err_msg=f"step {t}")
  # A Tucker-projected core (6 x 5 x 4 at rank 3: a 3 x 3 x 3 core): "rotate" keeps the
  # factors, so it gives exactly what "keep" gives.
  core_grads = random_grads((6, 5, 4), 5, seed=10)
  outs = {}
  for policy in ("rotate", "keep"):
    tx = ng.galore_projection(ng.kronecker_precondition(), rank=3, update_proj_gap=2,
                              refresh_policy=policy)
    state = tx.init({"w": jnp.zeros((6, 5, 4))})
    outs[policy] = []
    for g in core_grads:
      updates, state = tx.update({"w": jnp.asarray(g)}, state)
      assert np.all(np.isfinite(np.asarray(updates["w"])))
      outs[policy].append(np.asarray(updates["w"]))
    assert state.inner_states["w"].rows.shape == (3, 3, 3)
  np.testing.assert_array_equal(np.stack(outs["rotate"]), np.stack(outs["keep"]))


def test_chain_with_adam_converges_on_stochastic_regression():
  key = jax.random.key(0)
  target = jax.random.normal(key, (16, 8))
  loss = lambda p, x: jnp.mean((x @ p["w"] - x @ target) ** 2)
  tx = optax.chain(ng.kronecker_precondition(), optax.adam(0.02))
  params = {"w": jnp.zeros((16, 8))}
  state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    updates, state = tx.update(jax.grad(loss)(params, jax.random.normal(k, (32, 16))), state)
    return optax.apply_updates(params, updates), state

  for i in range(300):
    params, state = step(params, state, jax.random.fold_in(key, i))
  error = float(jnp.sum((params["w"] - target) ** 2))
  assert error < 1e-2 * float(jnp.sum(target ** 2))


@pytest.mark.parametrize("kwargs,name", [
    (dict(beta=1.0), "beta"), (dict(beta=-0.1), "beta"), (dict(beta=float("nan")), "beta"),
    (dict(damping=0.0), "damping"), (dict(damping=float("inf")), "damping"),
    (dict(damping=float("nan")), "damping"), (dict(exponent=0.0), "exponent"),
    (dict(exponent=-2.0), "exponent"), (dict(exponent=float("nan")), "exponent"),
    (dict(damping_mode="trace"), "damping_mode"), (dict(side="left"), "side"),
    (dict(root_every=0), "root_every"), (dict(root_every=2.0), "root_every")])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ng.kronecker_precondition(**kwargs)


def test_sides_constant_and_damping_modes():
  assert ng.KRONECKER_SIDES == ("auto", "rows", "cols")
  for mode in ng.DAMPING_MODES:
    ng.kronecker_precondition(damping_mode=mode)


@pytest.mark.parametrize("inner", ["kronecker", "int8_history"])
def test_state_survives_nnx_optimizer(inner):
  nnx = pytest.importorskip("flax.nnx")

  class Model(nnx.Module):

    def __init__(self, rngs):
      self.linear = nnx.Linear(12, 6, rngs=rngs)

    def __call__(self, x):
      return self.linear(x)

  preconditioner = (ng.kronecker_precondition(root_every=2) if inner == "kronecker" else
                    ng.woodbury_precondition(history_size=3, history_dtype=jnp.int8))
  model = Model(nnx.Rngs(0))
  tx = ng.galore_projection(optax.chain(preconditioner, optax.scale_by_adam()), rank=2,
                            update_proj_gap=1)
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  x = jnp.ones((4, 12))
  for _ in range(3):
    optimizer.update(model, nnx.grad(lambda m: jnp.mean(m(x) ** 2))(model))
  state_type = ng.KroneckerState if inner == "kronecker" else ng.WoodburyState
  found = [s for s in jax.tree.leaves(optimizer.opt_state,
                                      is_leaf=lambda s: isinstance(s, state_type))
           if isinstance(s, state_type)]
  assert found
  for leaf in jax.tree.leaves(nnx.state(model)):
    assert np.all(np.isfinite(np.asarray(leaf)))
  counts = ng.optimizer_state_bytes(optimizer.opt_state)
  # kernel 12 x 6 (std: right, coefficients 12 x 2): a 2 x 2 factor, root and two scales; the
  # 1-D bias has none. Or 3 int8 slots of 12 x 2 and of the bias (6,), 3 float32 scales each.
  if inner == "kronecker":
    assert counts["curvature"] == 2 * 4 * (2 * 2 + 1)
  else:
    assert counts["history"] == 3 * (12 * 2 + 6) + 2 * 3 * 4
