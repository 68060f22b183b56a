"""The optax-style battery, run over every optimizer the library offers.

Modelled on ``optax/contrib/_common_test.py``: convergence on a small stochastic problem, one
compilation for every step, dtypes and state structure preserved, composition with optax's
wrappers (``MultiSteps``, ``inject_hyperparams``, ``apply_if_finite``), finite output for
degenerate gradients, and construction-time argument errors.
"""

import functools
import inspect
import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng

LR = 2e-2
GAP = 50


def woodbury_adam(learning_rate, *, history_size=10, damping=1e-3):
  """The natural-gradient step in the full space, then Adam (no projection)."""
  return optax.chain(ng.woodbury_precondition(history_size=history_size, damping=damping),
                     optax.adam(learning_rate))


# name -> (factory, keyword arguments). Every factory takes ``learning_rate`` first.
OPTIMIZERS = {
    "galore": (ng.galore, dict(rank=4, scale=1.0)),
    # proj_type="std": rank 8 then spans the whole smaller side of the 16 x 8 regression below, so
    # that test measures the natural-gradient step, not what a rank-8 subspace of the 16-wide
    # side (the aliases' default, reverse_std) loses on fresh minibatches (6% of the error left).
    "natural_galore": (ng.natural_galore, dict(rank=8, history_size=5, scale=1.0,
                                               proj_type="std")),
    "natural_galore_sqrt_relative": (
        ng.natural_galore,
        dict(rank=8, history_size=5, scale=1.0, exponent=-0.5, damping_mode="relative")),
    "galore_rotate_staggered": (
        ng.galore, dict(rank=4, scale=1.0, refresh_policy="rotate", stagger_refresh=True)),
    # oversampling 2 keeps rank + oversampling below min(m, n), so the randomized path runs.
    "galore_randomized": (
        ng.galore, dict(rank=4, scale=1.0, svd_method="randomized", oversampling=2)),
    "natural_galore_reset": (
        ng.natural_galore, dict(rank=8, history_size=5, scale=1.0, refresh_policy="reset",
                                proj_type="std")),
    # History 5: with the default 10 this reaches only ~20% of the initial error in 400 steps
    # (the inverse empirical Fisher with tiny absolute damping is slow here; not a defect).
    "woodbury_adam": (woodbury_adam, dict(history_size=5)),
}
NAMES = list(OPTIMIZERS)
# Integer arguments that set shapes or Python control flow: static under inject_hyperparams
# (the others it turns into traced hyperparameters).
STATIC_ARGS = ("rank", "update_proj_gap", "history_size", "oversampling", "power_iterations",
               "seed")


def make(name, learning_rate=LR, update_proj_gap=GAP):
  factory, kwargs = OPTIMIZERS[name]
  if factory is not woodbury_adam:
    kwargs = dict(kwargs, update_proj_gap=update_proj_gap)
  return factory(learning_rate, **kwargs)


# A tall matrix projected at rank 4 (natural GaLore's rank 8 is clipped to 5) and a 1-D leaf,
# which the aliases send to plain Adam.
SHAPES = {"w": (8, 5), "b": (5,)}


def make_params(dtype=jnp.float32, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(SHAPES))
  return {k: jax.random.normal(key, s, dtype) for key, (k, s) in zip(keys, SHAPES.items())}


def make_grads(num_steps, seed=1, dtype=jnp.float32, scale=1.0):
  return [jax.tree.map(lambda p: (scale * p).astype(dtype), make_params(jnp.float32, seed + t))
          for t in range(num_steps)]


def assert_tree_finite(tree, what):
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.inexact):
      where = jax.tree_util.keystr(path)
      assert bool(jnp.all(jnp.isfinite(leaf))), f"{what}: non-finite at {where}"


@functools.cache
def shared(name):
  """One optimizer per name, refreshing every 2 steps, shared by the tests on ``SHAPES``.

  ``jax.jit`` keys its compilation cache on the function, so every ``jax.jit(tx.update)`` of
  this ``tx`` reuses one executable per input signature. (For the same reason, compile counts
  are checked on optimizers of their own, never on this one.)
  """
  return make(name, update_proj_gap=2)


def run_steps(tx, grads, params=None):
  """Jitted updates applied in turn; returns (updates per step, final state, final params)."""
  step = jax.jit(tx.update)
  params = make_params() if params is None else params
  initial_state = state = tx.init(params)
  all_updates = []
  for g in grads:
    updates, state = step(g, state, params)
    chex.assert_trees_all_equal_structs(state, initial_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial_state)
    all_updates.append(updates)
    params = optax.apply_updates(params, updates)
  return all_updates, state, params


# -- convergence ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_stochastic_regression_with_one_compilation(name):
  """W (16 x 8), fresh minibatches x ~ N(0, 1) [32, 16], loss mean((x W - x W*)^2).

  Stochastic on purpose: on a deterministic quadratic successive gradients are nearly collinear,
  and the empirical-Fisher natural gradient with tiny absolute damping misbehaves there. The
  jitted step is called 400 times from Python: it must compile once (the state that comes out
  has exactly the avals, weak types included, that went in) and keep the state's structure.
  """
  num_steps = 400
  key_target, key_data = jax.random.split(jax.random.key(0))
  w_star = jax.random.normal(key_target, (16, 8))
  tx = make(name)

  def loss(params, x):
    return jnp.mean((x @ params["w"] - x @ w_star) ** 2)

  @jax.jit
  def train_step(params, state, key):
    x = jax.random.normal(key, (32, 16))
    updates, state = tx.update(jax.grad(loss)(params, x), state, params)
    return optax.apply_updates(params, updates), state

  params = {"w": jnp.zeros((16, 8))}
  initial_state = state = tx.init(params)
  for key in jax.random.split(key_data, num_steps):
    params, state = train_step(params, state, key)
  assert train_step._cache_size() == 1
  chex.assert_trees_all_equal_structs(state, initial_state)
  chex.assert_trees_all_equal_shapes_and_dtypes(state, initial_state)
  initial_error = float(jnp.sum(w_star ** 2))
  final_error = float(jnp.sum((params["w"] - w_star) ** 2))
  # Measured (seed 0): 3.5e-3 of the initial error for the worst (natural_galore_reset),
  # <= 3e-4 for the others.
  assert final_error < 1e-2 * initial_error, (final_error, initial_error)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_dtype_and_state_structure_preserved(name):
  tx = make(name, update_proj_gap=2)  # a fresh optimizer: its own compilation; crosses a refresh
  step = jax.jit(tx.update)
  params = make_params(jnp.bfloat16)
  initial_state = state = tx.init(params)
  for g in make_grads(3, dtype=jnp.bfloat16):
    updates, state = step(g, state, params)
    for k in SHAPES:
      assert updates[k].dtype == jnp.bfloat16, (k, updates[k].dtype)
    params = optax.apply_updates(params, updates)
    for k in SHAPES:
      assert params[k].dtype == jnp.bfloat16, (k, params[k].dtype)
    chex.assert_trees_all_equal_structs(state, initial_state)
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial_state)
  assert step._cache_size() == 1
  assert_tree_finite(params, "params")
  assert_tree_finite(state, "state")


# -- optax wrappers ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_multi_steps_accumulates_then_updates(name):
  """optax.MultiSteps(tx, 2): a zero update, then tx's step on the mean of the 2 gradients."""
  k = 2
  tx = shared(name)
  multi = optax.MultiSteps(tx, every_k_schedule=k)
  step = jax.jit(multi.update)
  reference_step = jax.jit(tx.update)
  params = make_params()
  state = multi.init(params)
  reference_state = tx.init(params)
  grads = make_grads(3 * k)  # three real steps: the inner projector refreshes at 0 and 2
  for t, g in enumerate(grads):
    updates, state = step(g, state, params)
    if (t + 1) % k:
      for leaf in jax.tree.leaves(updates):
        np.testing.assert_array_equal(leaf, 0.0)
    else:
      mean = jax.tree.map(lambda *gs: sum(gs) / k, *grads[t + 1 - k:t + 1])
      want, reference_state = reference_step(mean, reference_state, params)
      for key in SHAPES:
        np.testing.assert_allclose(updates[key], want[key], rtol=1e-4, atol=1e-6,
                                   err_msg=f"step {t}, leaf {key!r}")
        assert float(jnp.max(jnp.abs(updates[key]))) > 0
      params = optax.apply_updates(params, updates)


@pytest.mark.parametrize("name", NAMES)
def test_inject_hyperparams_learning_rate_change_takes_effect(name):
  factory, kwargs = OPTIMIZERS[name]
  if factory is not woodbury_adam:
    kwargs = dict(kwargs, update_proj_gap=2)
  static = tuple(a for a in STATIC_ARGS if a in inspect.signature(factory).parameters)
  tx = optax.inject_hyperparams(factory, static_args=static)(learning_rate=LR, **kwargs)
  step = jax.jit(tx.update)
  params = make_params()
  state_a = state_b = tx.init(params)
  assert float(state_a.hyperparams["learning_rate"]) == pytest.approx(LR)
  for t, g in enumerate(make_grads(6)):
    if t == 2:  # double B's learning rate mid-run (A and B see the same gradients and params)
      lr = state_b.hyperparams["learning_rate"]
      state_b.hyperparams["learning_rate"] = jnp.asarray(2 * LR, lr.dtype)
    if t == 4:
      state_b.hyperparams["learning_rate"] = jnp.zeros_like(lr)
    updates_a, state_a = step(g, state_a, params)
    updates_b, state_b = step(g, state_b, params)
    factor = 1.0 if t < 2 else 2.0 if t < 4 else 0.0
    for k in SHAPES:
      assert float(jnp.max(jnp.abs(updates_a[k]))) > 0
      np.testing.assert_allclose(updates_b[k], factor * updates_a[k], rtol=1e-6, atol=1e-12,
                                 err_msg=f"step {t}, leaf {k!r}")
    params = optax.apply_updates(params, updates_a)
  assert step._cache_size() == 1  # changing a hyperparameter does not recompile


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_skips_a_nan_step(name):
  """A NaN gradient is skipped: zero update, state untouched, later steps as if it never came."""
  tx = optax.apply_if_finite(shared(name), max_consecutive_errors=3)
  step = jax.jit(tx.update)
  g1, g2, g3 = make_grads(3)
  bad = dict(g2, w=g2["w"].at[1, 2].set(jnp.nan))
  params = make_params()
  state = tx.init(params)
  _, state = step(g1, state, params)
  after_first = state
  updates, state = step(bad, state, params)
  for leaf in jax.tree.leaves(updates):
    np.testing.assert_array_equal(leaf, 0.0)
  assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
  chex.assert_trees_all_equal(state.inner_state, after_first.inner_state)
  updates, state = step(g3, state, params)
  assert int(state.notfinite_count) == 0 and bool(state.last_finite)
  assert_tree_finite(state, "state")
  # The same optimizer that never saw the NaN step.
  reference_state = tx.init(params)
  _, reference_state = step(g1, reference_state, params)
  want, reference_state = step(g3, reference_state, params)
  for k in SHAPES:
    np.testing.assert_allclose(updates[k], want[k], rtol=1e-6, atol=1e-9, err_msg=k)
  chex.assert_trees_all_close(state.inner_state, reference_state.inner_state, rtol=1e-6,
                              atol=1e-9)


# -- degenerate gradients ---------------------------------------------------------------------

DEGENERATE_STEPS = 5  # refreshes at steps 0, 2, 4


def assert_finite_and_bounded(all_updates, state, params):
  for t, updates in enumerate(all_updates):
    assert_tree_finite(updates, f"updates at step {t}")
    # Adam moves a coefficient by at most ~(1 - b1) / sqrt(1 - b2) ~ 3.2 learning rates; an
    # orthonormal basis maps r coefficients to entries <= sqrt(r) (r <= 5) times that: < 10 LR.
    # A 1/damping or 1/eps blow-up would be far larger. (Measured: <= 2 LR.)
    for k, u in updates.items():
      assert float(jnp.max(jnp.abs(u))) < 10 * LR, (t, k, float(jnp.max(jnp.abs(u))))
  assert_tree_finite(state, "state")
  assert_tree_finite(params, "params")


@pytest.mark.parametrize("name", NAMES)
def test_zero_gradients_give_zero_updates(name):
  zeros = jax.tree.map(jnp.zeros_like, make_params())
  all_updates, state, params = run_steps(shared(name), [zeros] * DEGENERATE_STEPS)
  for updates in all_updates:
    for leaf in jax.tree.leaves(updates):
      np.testing.assert_array_equal(leaf, 0.0)
  assert_tree_finite(state, "state")
  chex.assert_trees_all_equal(params, make_params())


@pytest.mark.parametrize("name", NAMES)
def test_rank_one_gradients_give_finite_updates(name):
  """Rank-deficient: the SVD's trailing vectors are arbitrary, the history is collinear."""
  u, v = jax.random.normal(jax.random.key(99), (2, 8))
  # The same rank-1 direction every step (a collinear history), growing, and a rank-1 "b"
  # too: the same vector every step.
  grads = [{"w": (1.0 + t) * jnp.outer(u, v[:5]), "b": v[:5]} for t in range(DEGENERATE_STEPS)]
  assert_finite_and_bounded(*run_steps(shared(name), grads))


@pytest.mark.parametrize("scale", [1e-8, 1e-4, 1e4, 1e8])
@pytest.mark.parametrize("name", NAMES)
def test_finite_updates_across_gradient_scales(name, scale):
  grads = make_grads(DEGENERATE_STEPS, scale=scale)
  assert_finite_and_bounded(*run_steps(shared(name), grads))


# -- construction errors ----------------------------------------------------------------------


@pytest.mark.parametrize("build, argument", [
    (lambda: ng.galore(LR, rank=0), "rank"),
    (lambda: ng.natural_galore(LR, rank=-2), "rank"),
    (lambda: ng.galore_projection(optax.scale_by_adam(), rank=0), "rank"),
    (lambda: ng.galore(LR, rank=4, update_proj_gap=0), "update_proj_gap"),
    (lambda: ng.natural_galore(LR, rank=4, update_proj_gap=-1), "update_proj_gap"),
    (lambda: ng.natural_galore(LR, rank=4, history_size=0), "history_size"),
    (lambda: ng.woodbury_precondition(history_size=0), "history_size"),
    (lambda: ng.natural_galore(LR, rank=4, damping=0.0), "damping"),
    (lambda: ng.natural_galore(LR, rank=4, damping=-1e-3), "damping"),
    (lambda: ng.woodbury_precondition(damping=0.0), "damping"),
    (lambda: ng.galore(LR, rank=4, proj_type="diagonal"), "proj_type"),
    (lambda: ng.natural_galore(LR, rank=4, proj_type="two_sided"), "proj_type"),
    (lambda: ng.galore(LR, rank=4, refresh_policy="forget"), "refresh_policy"),
    (lambda: ng.natural_galore(LR, rank=4, refresh_policy="rotate_all"), "refresh_policy"),
])
def test_bad_arguments_raise_value_error_naming_them(build, argument):
  with pytest.raises(ValueError, match=rf"\b{re.escape(argument)}\b"):
    build()


@pytest.mark.parametrize("use_jit", [False, True], ids=["eager", "jit"])
def test_inner_transform_that_needs_params_fails_clearly(use_jit):
  inner = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2))
  tx = ng.galore_projection(inner, rank=2)
  params = make_params()
  state = tx.init(params)
  update = jax.jit(tx.update) if use_jit else tx.update
  with pytest.raises(ValueError, match=r"(?s)add_decayed_weights.*outside|outside.*add_decayed"):
    update(make_grads(1)[0], state, params)
