"""woodbury_precondition against a dense float64 NumPy reference of the paper's formulas."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng


def dense_reference(grads, history_size, damping, exponent=-1.0, relative=False):
  """(lam I + H H^T)^p g_t for each step t, with the k x k matrix formed explicitly (float64)."""
  outs = []
  for t in range(len(grads)):
    window = grads[max(0, t - history_size + 1):t + 1]
    h = np.stack([g.reshape(-1) for g in window], axis=1).astype(np.float64)  # k x s
    fisher = h @ h.T
    lam = damping * np.linalg.eigvalsh(fisher)[-1] if relative else damping
    eigenvalues, eigenvectors = np.linalg.eigh(lam * np.eye(h.shape[0]) + fisher)
    matrix_power = eigenvectors @ np.diag(eigenvalues ** exponent) @ eigenvectors.T
    outs.append((matrix_power @ grads[t].reshape(-1).astype(np.float64)).reshape(grads[t].shape))
  return outs


def dense_reference_high_precision(grads, history_size, damping, digits=60):
  """The same dense solve in 60-digit arithmetic (mpmath): float64 cannot resolve
  lam = 1e-3 next to |g|^2 = 1e16."""
  mpmath = pytest.importorskip("mpmath", reason="mpmath (a torch/sympy dependency) is needed")
  mpmath.mp.dps = digits
  outs = []
  for t in range(len(grads)):
    window = grads[max(0, t - history_size + 1):t + 1]
    h = mpmath.matrix([[float(v) for v in g.reshape(-1)] for g in window]).T  # k x s
    k = h.rows
    fisher = h * h.T + mpmath.mpf(damping) * mpmath.eye(k)
    solution = mpmath.lu_solve(fisher, mpmath.matrix([float(v) for v in grads[t].reshape(-1)]))
    outs.append(np.array([float(solution[i]) for i in range(k)]).reshape(grads[t].shape))
  return outs


def run(tx, grads):
  state = tx.init({"w": jnp.zeros_like(grads[0])})
  step = jax.jit(tx.update)
  outs = []
  for g in grads:
    updates, state = step({"w": jnp.asarray(g)}, state)
    outs.append(np.asarray(updates["w"]))
  return outs


@pytest.mark.parametrize("shape", [(6, 4), (3, 7), (5,), (2, 3, 4)])
@pytest.mark.parametrize("history_size", [1, 3, 5])
def test_matches_dense_inverse_fisher(shape, history_size):
  rng = np.random.default_rng(0)
  grads = [rng.normal(size=shape).astype(np.float32) for _ in range(8)]
  damping = 0.5
  outs = run(ng.woodbury_precondition(history_size=history_size, damping=damping), grads)
  for got, want in zip(outs, dense_reference(grads, history_size, damping)):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("exponent,solver", [(-1.0, "cholesky"), (-0.5, "auto"), (-0.25, "eigh")])
def test_other_exponents_and_solvers(exponent, solver):
  rng = np.random.default_rng(1)
  grads = [rng.normal(size=(9, 4)).astype(np.float32) for _ in range(6)]
  tx = ng.woodbury_precondition(history_size=4, damping=0.3, exponent=exponent, solver=solver)
  for got, want in zip(run(tx, grads), dense_reference(grads, 4, 0.3, exponent)):
    np.testing.assert_allclose(got, want, rtol=3e-4, atol=3e-5)


def test_relative_damping():
  rng = np.random.default_rng(2)
  grads = [100.0 * rng.normal(size=(12,)).astype(np.float32) for _ in range(5)]
  tx = ng.woodbury_precondition(history_size=3, damping=0.1, damping_mode="relative")
  for got, want in zip(run(tx, grads), dense_reference(grads, 3, 0.1, relative=True)):
    np.testing.assert_allclose(got, want, rtol=3e-4, atol=1e-9)


@pytest.mark.parametrize("gradient_scale", [1e-8, 1e-4, 1.0, 1e3, 1e8])
def test_small_damping_at_every_gradient_scale(gradient_scale):
  # damping << |g|^2: eq. 12 as printed, (g - H z) / damping, cancels catastrophically here.
  rng = np.random.default_rng(3)
  grads = [(gradient_scale * rng.normal(size=(24,))).astype(np.float32) for _ in range(6)]
  outs = run(ng.woodbury_precondition(history_size=4, damping=1e-3), grads)
  for got, want in zip(outs, dense_reference_high_precision(grads, 4, 1e-3)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.max(np.abs(want)))


@pytest.mark.parametrize("case", ["zeros", "repeated", "rank_one", "huge", "tiny"])
def test_finite_on_degenerate_histories(case):
  rng = np.random.default_rng(4)
  base = rng.normal(size=(16, 3)).astype(np.float32)
  grads = {
      "zeros": [np.zeros_like(base)] * 5,
      "repeated": [base] * 5,
      "rank_one": [c * base for c in (1.0, -2.0, 3.0, 0.5, 1e-3)],
      "huge": [1e8 * base, -1e8 * base, 1e8 * rng.normal(size=base.shape).astype(np.float32)],
      "tiny": [1e-8 * base, 1e-8 * rng.normal(size=base.shape).astype(np.float32)],
  }[case]
  outs = run(ng.woodbury_precondition(history_size=4, damping=1e-3), grads)
  for got in outs:
    assert np.all(np.isfinite(got))
  if case == "zeros":
    assert all(np.all(o == 0) for o in outs)
  if case == "repeated":
    # Exact answer for s copies of g: g / (lam + s |g|^2). The s x s system is singular up to
    # the damping floor here, so float32 gives it to about 1%, not to 1e-4.
    for s, got in enumerate(outs[:4], start=1):
      want = base / (1e-3 + s * np.sum(base.astype(np.float64) ** 2))
      np.testing.assert_allclose(got, want, rtol=1e-2)


def test_history_dtype_and_fifo():
  tx = ng.woodbury_precondition(history_size=2, damping=1.0, history_dtype=jnp.bfloat16)
  state = tx.init({"w": jnp.zeros((3,))})
  assert state.history["w"].shape == (2, 3) and state.history["w"].dtype == jnp.bfloat16
  for value in (1.0, 2.0, 3.0):
    _, state = tx.update({"w": jnp.full((3,), value)}, state)
  # The oldest gradient (1.0) has been overwritten; slots hold 3.0 (position 0) and 2.0.
  np.testing.assert_array_equal(np.asarray(state.history["w"], np.float32)[:, 0], [3.0, 2.0])


@pytest.mark.parametrize("kwargs,name", [
    (dict(history_size=0), "history_size"), (dict(damping=0.0), "damping"),
    (dict(damping=-1.0), "damping"), (dict(exponent=0.5), "exponent"),
    (dict(damping_mode="trace"), "damping_mode"), (dict(solver="lu"), "solver"),
    (dict(exponent=-0.5, solver="cholesky"), "solver")])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ng.woodbury_precondition(**kwargs)


def test_bf16_gradients_keep_dtype():
  tx = ng.woodbury_precondition(history_size=3)
  state = tx.init({"w": jnp.zeros((4, 4), jnp.bfloat16)})
  updates, _ = tx.update({"w": jnp.ones((4, 4), jnp.bfloat16)}, state)
  assert updates["w"].dtype == jnp.bfloat16


def test_chain_with_adam_converges_on_stochastic_regression():
  # The empirical Fisher needs gradient noise: on a deterministic quadratic successive gradients
  # are nearly collinear and (lam I + H H^T)^{-1} amplifies their tiny differences.
  key = jax.random.key(0)
  target = jax.random.normal(key, (16, 8))
  loss = lambda p, x: jnp.mean((x @ p["w"] - x @ target) ** 2)
  tx = optax.chain(ng.woodbury_precondition(history_size=5, damping=1e-3), optax.adam(0.02))
  params = {"w": jnp.zeros((16, 8))}
  state = tx.init(params)

  @jax.jit
  def step(params, state, k):
    updates, state = tx.update(jax.grad(loss)(params, jax.random.normal(k, (32, 16))), state)
    return optax.apply_updates(params, updates), state

  for i in range(400):
    params, state = step(params, state, jax.random.fold_in(key, i))
  error = float(jnp.sum((params["w"] - target) ** 2))
  assert error < 1e-2 * float(jnp.sum(target ** 2))


# -- argument validation and edge cases ------------------------------------------------------


@pytest.mark.parametrize("kwargs,name", [
    (dict(damping=float("inf")), "damping"), (dict(damping=float("nan")), "damping"),
    (dict(exponent=float("nan")), "exponent"),
    (dict(history_dtype=jnp.int32), "history_dtype"),
    (dict(history_dtype=jnp.uint8), "history_dtype"),
    (dict(history_dtype=jnp.int16), "history_dtype"),
    (dict(history_dtype=bool), "history_dtype"),
    (dict(history_dtype="not-a-dtype"), "history_dtype")])
def test_non_finite_and_integer_arguments_are_rejected(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ng.woodbury_precondition(**kwargs)


def test_damping_modes_constant_lists_the_accepted_modes():
  assert ng.DAMPING_MODES == ("absolute", "relative")
  for mode in ng.DAMPING_MODES:
    ng.woodbury_precondition(damping_mode=mode)


@pytest.mark.parametrize("history_dtype", [None, jnp.int8])
def test_zero_size_leaf_passes_through_with_an_empty_history(history_dtype):
  rng = np.random.default_rng(6)
  grads = [{"empty": np.zeros((0, 3), np.float32), "w": rng.normal(size=(5,)).astype(np.float32)}
           for _ in range(3)]
  tx = ng.woodbury_precondition(history_size=2, damping=0.5, history_dtype=history_dtype)
  state = tx.init(jax.tree.map(jnp.zeros_like, grads[0]))
  assert state.history["empty"].shape == (2, 0, 3)
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    updates, state = step(jax.tree.map(jnp.asarray, g), state)
    assert updates["empty"].shape == (0, 3) and updates["empty"].dtype == jnp.float32
    want = dense_reference([x["w"] for x in grads[:t + 1]], 2, 0.5)[-1]
    # The other leaf is unaffected; int8 only perturbs the older gradients (see below).
    np.testing.assert_allclose(updates["w"], want, rtol=1e-2 if history_dtype else 2e-4,
                               atol=1e-3 if history_dtype else 2e-5)


# -- the int8 history ------------------------------------------------------------------------


def numpy_quantize(g):
  """Per-vector absmax int8 quantiser in float64: (q, scale) with g ~ q * scale."""
  g = np.asarray(g, np.float64)
  absmax = np.max(np.abs(g))
  if absmax == 0:
    return np.zeros(g.shape, np.int8), 0.0
  return np.rint(g / absmax * 127).astype(np.int8), absmax / 127


def numpy_dequantize(q, scale):
  return q.astype(np.float64) * scale


@pytest.mark.parametrize("magnitude", [1e-30, 1e-8, 1.0, 1e8, 1e30])
def test_int8_history_round_trip_matches_a_numpy_quantiser(magnitude):
  rng = np.random.default_rng(7)
  grads = [(magnitude * rng.standard_t(3, size=(12, 5))).astype(np.float32) for _ in range(4)]
  tx = ng.woodbury_precondition(history_size=3, history_dtype=jnp.int8)
  state = tx.init({"w": jnp.zeros((12, 5))})
  assert state.history["w"].dtype == jnp.int8 and state.scales["w"].shape == (3,)
  assert state.scales["w"].dtype == jnp.float32
  step = jax.jit(tx.update)
  for t, g in enumerate(grads):
    _, state = step({"w": jnp.asarray(g)}, state)
    slot = t % 3
    q = np.asarray(state.history["w"][slot])
    scale = float(state.scales["w"][slot])
    q_ref, scale_ref = numpy_quantize(g)
    np.testing.assert_allclose(scale, scale_ref, rtol=1e-6)
    # Rounding g / absmax * 127 in float32 may land a half-way value on the other side.
    assert np.max(np.abs(q.astype(int) - q_ref.astype(int))) <= 1
    assert np.mean(q == q_ref) > 0.99
    absmax = np.max(np.abs(g.astype(np.float64)))
    error = np.abs(g.astype(np.float64) - numpy_dequantize(q, scale))
    # Half a quantisation step, plus float32 rounding of the product q * scale.
    assert np.all(error <= absmax / 254 * (1 + 1e-5) + 2 * np.finfo(np.float32).eps * absmax)


def int8_reference(grads, history_size, damping, relative=False):
  """(lam I + H H^T)^{-1} g_t in float64 with H = [deq(q(g_i)) for older i, g_t]."""
  outs = []
  for t in range(len(grads)):
    window = grads[max(0, t - history_size + 1):t + 1]
    stored = [numpy_dequantize(*numpy_quantize(g)) for g in window[:-1]]
    outs.append(dense_reference(stored + [window[-1].astype(np.float64)], history_size,
                                damping, relative=relative)[-1])
  return outs


@pytest.mark.parametrize("damping,relative", [(0.5, False), (1e-3, True)])
def test_int8_direction_matches_the_dequantised_reference(damping, relative):
  rng = np.random.default_rng(8)
  grads = [rng.normal(size=(16, 8)).astype(np.float32) for _ in range(9)]
  tx = ng.woodbury_precondition(history_size=4, damping=damping, history_dtype=jnp.int8,
                                damping_mode="relative" if relative else "absolute")
  outs = run(tx, grads)
  for t, (got, want) in enumerate(zip(outs, int8_reference(grads, 4, damping, relative))):
    # Tight: the same maths on the same (dequantised) history, float32 against float64.
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5 * np.max(np.abs(want)),
                               err_msg=f"step {t}")
  exact = dense_reference(grads, 4, damping, relative=relative)
  for t, (got, want) in enumerate(zip(outs, exact)):
    # Loose: against the unquantised history. Each stored entry moves by <= absmax / 254; on
    # these well-conditioned histories that changes the direction by < 1% (measured 0.2-0.4%).
    assert np.linalg.norm(got - want) <= 1e-2 * np.linalg.norm(want), f"step {t}"


@pytest.mark.parametrize("magnitude", [1e-30, 1e-10, 1e10, 1e30])
def test_int8_history_at_extreme_gradient_scales(magnitude):
  rng = np.random.default_rng(9)
  grads = [(magnitude * rng.normal(size=(10, 3))).astype(np.float32) for _ in range(5)]
  tx = ng.woodbury_precondition(history_size=3, damping=0.1, damping_mode="relative",
                                history_dtype=jnp.int8)
  outs = run(tx, grads)
  # Relative damping makes the answer scale with 1 / magnitude: compare in units of it.
  for got, want in zip(outs, int8_reference(grads, 3, 0.1, relative=True)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got * magnitude, want * magnitude, rtol=1e-3,
                               atol=1e-5 * np.max(np.abs(want * magnitude)))
  for got in run(ng.woodbury_precondition(history_size=3, damping=1e-3,
                                          history_dtype=jnp.int8), grads):
    assert np.all(np.isfinite(got)) and np.any(got != 0)


def test_int8_history_of_zero_gradients():
  tx = ng.woodbury_precondition(history_size=3, history_dtype=jnp.int8)
  state = tx.init({"w": jnp.zeros((4, 4))})
  for _ in range(4):
    updates, state = tx.update({"w": jnp.zeros((4, 4))}, state)
    np.testing.assert_array_equal(updates["w"], 0.0)
  np.testing.assert_array_equal(state.history["w"], 0)
  np.testing.assert_array_equal(state.scales["w"], 0.0)
  # A later non-zero gradient sees an all-zero past: g / (lam + |g|^2).
  g = np.arange(16, dtype=np.float32).reshape(4, 4) - 7.5
  updates, _ = tx.update({"w": jnp.asarray(g)}, state)
  want = g / (1e-3 + np.sum(g.astype(np.float64) ** 2))
  np.testing.assert_allclose(updates["w"], want, rtol=1e-5)


def test_int8_history_memory_is_counted_under_history():
  params = {"w": jnp.zeros((16, 8)), "b": jnp.zeros((8,))}
  tx = ng.woodbury_precondition(history_size=5, history_dtype=jnp.int8)
  counts = ng.optimizer_state_bytes(jax.eval_shape(tx.init, params))
  assert counts["history"] == 5 * (16 * 8 + 8) * 1 + 2 * 5 * 4  # int8 entries + a scale per slot
  float_counts = ng.optimizer_state_bytes(jax.eval_shape(
      ng.woodbury_precondition(history_size=5).init, params))
  assert float_counts["history"] == 5 * (16 * 8 + 8) * 4
  inner = optax.chain(ng.woodbury_precondition(history_size=5, history_dtype=jnp.int8),
                      optax.scale_by_adam())
  projected = ng.galore_projection(inner, rank=2)
  counts = ng.optimizer_state_bytes(jax.eval_shape(projected.init, params))
  # w: coefficients 16 x 2 (std keeps the smaller side); b: unprojected.
  assert counts["history"] == 5 * (16 * 2 + 8) + 2 * 5 * 4


@pytest.mark.parametrize("history_dtype", [jnp.float32, jnp.int8])
def test_rotate_refresh_moves_the_history_into_the_new_basis(history_dtype):
  # Right projection (12 x 5, std): coefficients C = G Q; a refresh maps C to C R^T with
  # R = Q_new^T Q_old. The int8 history is dequantised, rotated and requantised.
  rng = np.random.default_rng(10)
  grads = [rng.normal(size=(12, 5)).astype(np.float32) for _ in range(3)]
  inner = ng.woodbury_precondition(history_size=3, damping=0.5, history_dtype=history_dtype)
  tx = ng.galore_projection(inner, rank=2, update_proj_gap=1, refresh_policy="rotate")
  state = tx.init({"w": jnp.zeros((12, 5))})
  step = jax.jit(tx.update)
  states = []
  for g in grads:
    _, state = step({"w": jnp.asarray(g)}, state)
    states.append(state)
  quantised = history_dtype == jnp.int8
  for t in (1, 2):
    # Inside the projection the inner state is per leaf: its history is one array.
    before, after = states[t - 1].inner_states["w"], states[t].inner_states["w"]
    old = np.asarray(states[t - 1].projectors["w"][0], np.float64)
    new = np.asarray(states[t].projectors["w"][0], np.float64)
    rotation = new.T @ old
    for slot in range(t):  # slots written before step t
      stored = np.asarray(before.history[slot], np.float64)
      if quantised:
        stored = numpy_dequantize(stored, float(before.scales[slot]))
      want = stored @ rotation.T
      got = np.asarray(after.history[slot], np.float64)
      if quantised:
        q_ref, scale_ref = numpy_quantize(want)
        np.testing.assert_allclose(float(after.scales[slot]), scale_ref, rtol=1e-5)
        assert np.max(np.abs(got - q_ref)) <= 1
        got = numpy_dequantize(got, float(after.scales[slot]))
        np.testing.assert_allclose(got, want, atol=np.max(np.abs(want)) / 254 * 1.001)
      else:
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    current = np.asarray(after.history[t], np.float64)
    coefficients = grads[t].astype(np.float64) @ new
    if quantised:
      current = numpy_dequantize(current, float(after.scales[t]))
      np.testing.assert_allclose(current, coefficients,
                                 atol=np.max(np.abs(coefficients)) / 254 * 1.001)
    else:
      np.testing.assert_allclose(current, coefficients, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("solver", ["eigh", "cholesky"])
@pytest.mark.parametrize("gradient_scale", [1e-30, 1e-20, 1e20, 1e30])
def test_absolute_damping_at_extreme_gradient_scales(solver, gradient_scale):
  # lam / scale**2 (the damping of the rescaled problem) overflows float32 below ~1e-20; the
  # answer, about g / lam there, does not.
  rng = np.random.default_rng(11)
  grads = [(gradient_scale * rng.normal(size=(24,))).astype(np.float32) for _ in range(6)]
  outs = run(ng.woodbury_precondition(history_size=4, damping=1e-3, solver=solver), grads)
  for got, want in zip(outs, dense_reference_high_precision(grads, 4, 1e-3, digits=100)):
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-6 * np.max(np.abs(want)))


def test_int8_history_dtype_by_name():
  state = ng.woodbury_precondition(history_size=2, history_dtype="int8").init(
      {"w": jnp.zeros((3, 2), jnp.bfloat16)})
  assert state.history["w"].dtype == jnp.int8 and state.scales["w"].dtype == jnp.float32
  assert ng.woodbury_precondition(history_size=2).init({"w": jnp.zeros((3,))}).scales is None
