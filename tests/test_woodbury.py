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
