"""ng.OFFICIAL_CODE_SETTINGS (the authors' code's setting) and natural_galore's preconditioners."""

import inspect
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng
from models import llama

LR = 1e-2


def params_and_grads(steps=4, seed=0):
  rng = np.random.default_rng(seed)
  shapes = {"w": (8, 6), "t": (3, 5, 4), "b": (6,)}
  params = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
  grads = [{k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
           for _ in range(steps)]
  return params, grads


def run(tx, steps=4, seed=0):
  params, grads = params_and_grads(steps, seed)
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append({k: np.asarray(v) for k, v in updates.items()})
  return out, state


def test_official_settings_are_a_read_only_set_of_natural_galore_options():
  settings = ng.OFFICIAL_CODE_SETTINGS
  assert isinstance(settings, types.MappingProxyType)
  with pytest.raises(TypeError):
    settings["history_size"] = 10  # type: ignore[index]
  parameters = inspect.signature(ng.natural_galore).parameters
  for name in settings:
    assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
  # The values of the authors' code (see the comments in ngalore_jax/_alias.py).
  assert dict(settings) == dict(proj_type="full", history_size=20, damping=1e-3, exponent=-1.0,
                                damping_mode="absolute", eps=1e-6, refresh_policy="keep",
                                history_dtype=None)


def test_official_preset_is_the_hand_written_call():
  got, got_state = run(ng.natural_galore(LR, rank=3, update_proj_gap=2,
                                         **ng.OFFICIAL_CODE_SETTINGS))
  want, _ = run(ng.natural_galore(
      LR, rank=3, update_proj_gap=2, proj_type="full", history_size=20, damping=1e-3,
      exponent=-1.0, damping_mode="absolute", eps=1e-6, refresh_policy="keep",
      history_dtype=None))
  for got_step, want_step in zip(got, want):
    for k in got_step:
      np.testing.assert_array_equal(got_step[k], want_step[k], err_msg=k)
  projection = got_state[0].inner_states["galore"].inner_state
  assert [f.shape for f in projection.projectors["w"]] == [(8, 3), (6, 3)]  # two-sided
  woodbury, adam = projection.inner_states["w"]
  assert woodbury.history.shape == (20, 3, 3) and adam.mu.shape == (3, 3)


def authors_natural_gradient(history, damping):
  """The authors' formula, lam^-1 g - lam^-2 H (I + H^T H / lam)^-1 H^T g, in float64."""
  h = np.stack([x.ravel() for x in history], axis=1)
  g = h[:, -1]
  inner = np.eye(h.shape[1]) + h.T @ h / damping
  return (g / damping - h @ np.linalg.solve(inner, h.T @ g) / damping ** 2).reshape(
      history[-1].shape)


def test_official_preset_matches_a_float64_reference_of_the_authors_step():
  """Two-sided SVD projection, a 20-gradient history that is never cleared (24 steps: it
  wraps), the natural-gradient step, then Adam with eps 1e-6, state kept across refreshes.

  Adam's eps is added after the bias correction here, as optax does (the authors add it to
  the uncorrected sqrt(v); OFFICIAL_CODE_SETTINGS documents the difference). Step 0's gradient
  is diagonal, so that the rounding of its SVD cannot meet Adam's empty moments (see
  tests/test_two_sided_projection.py).
  """
  shape, rank, gap, steps, size, damping, eps, scale = (8, 6), 3, 5, 24, 20, 1e-3, 1e-6, 0.25
  rng = np.random.default_rng(7)
  grads = [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]
  grads[0] = np.diag(np.array([4.0, -3.2, 2.5, 1.7, -1.1, 0.6], np.float32))
  grads[0] = np.concatenate([grads[0], np.zeros((2, 6), np.float32)])
  tx = ng.natural_galore(LR, rank=rank, update_proj_gap=gap, scale=scale,
                         **ng.OFFICIAL_CODE_SETTINGS)
  params = {"w": jnp.zeros(shape)}
  state = tx.init(params)
  update = jax.jit(tx.update)
  history, mu, nu = [], np.zeros((rank, rank)), np.zeros((rank, rank))
  for t, g in enumerate(grads):
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    factors = state[0].inner_states["galore"].inner_state.projectors["w"]
    if t % gap == 0:
      u, s, vt = np.linalg.svd(g.astype(np.float64), full_matrices=False)
      u, v = u[:, :rank], vt[:rank].T
      # Singular vectors are defined up to sign: take ng's.
      u, v = (x * np.sign(np.sum(x * np.asarray(f), axis=0)) for x, f in zip((u, v), factors))
    history = (history + [u.T @ g.astype(np.float64) @ v])[-size:]
    direction = authors_natural_gradient(history, damping)
    mu = 0.9 * mu + 0.1 * direction
    nu = 0.999 * nu + 0.001 * direction ** 2
    adam = (mu / (1 - 0.9 ** (t + 1))) / (np.sqrt(nu / (1 - 0.999 ** (t + 1))) + eps)
    want = -LR * scale * (u @ adam @ v.T)
    np.testing.assert_allclose(np.asarray(updates["w"]), want, rtol=1e-4,
                               atol=1e-4 * np.max(np.abs(want)), err_msg=f"step {t}")


# Options of the Kronecker preconditioner, each away from its default.
KRONECKER = dict(kronecker_beta=0.8, damping=1e-2, exponent=-0.5, damping_mode="relative")


def kronecker_by_hand(**projection):
  """natural_galore(preconditioner="kronecker")'s documented composition, from building blocks."""
  curvature = ng.kronecker_precondition(beta=0.8, damping=1e-2, exponent=-0.5,
                                        damping_mode="relative")
  labels = lambda params: {k: "galore" if k == "w" else "adam" for k in params}
  return optax.chain(
      optax.partition({"galore": ng.galore_projection(
          optax.chain(curvature, optax.scale_by_adam()), **projection),
                       "adam": optax.scale_by_adam()}, labels),
      optax.add_decayed_weights(0.1, lambda params: {k: k != "b" for k in params}),
      optax.scale_by_learning_rate(LR))


def test_kronecker_preconditioner_is_the_hand_built_chain():
  projection = dict(rank=2, update_proj_gap=2, scale=0.5, proj_type="reverse_std")
  mask = lambda params: {k: k == "w" for k in params}
  decay_mask = lambda params: {k: k != "b" for k in params}
  tx = ng.natural_galore(LR, preconditioner="kronecker", weight_decay=0.1, mask=mask,
                         weight_decay_mask=decay_mask, **KRONECKER, **projection)
  got, state = run(tx)
  want, _ = run(kronecker_by_hand(**projection))
  for t, (got_step, want_step) in enumerate(zip(got, want)):
    for k in got_step:
      np.testing.assert_allclose(got_step[k], want_step[k], rtol=2e-4, atol=1e-7,
                                 err_msg=f"step {t}, {k}")
  inner = state[0].inner_states["galore"].inner_state.inner_states["w"]
  assert isinstance(inner[0], ng.KroneckerState) and inner[0].rows.shape == (2, 2)
  # The history's preconditioner on the same projection gives other updates.
  woodbury, _ = run(ng.natural_galore(LR, weight_decay=0.1, mask=mask,
                                      weight_decay_mask=decay_mask, damping=1e-2,
                                      exponent=-0.5, damping_mode="relative", **projection))
  assert not np.allclose(woodbury[-1]["w"], got[-1]["w"], rtol=1e-3)


@pytest.mark.parametrize("kwargs,name", [
    (dict(preconditioner="shampoo"), "preconditioner"),
    (dict(preconditioner="kronecker", history_size=5), "history_size"),
    (dict(preconditioner="kronecker", history_dtype=jnp.bfloat16), "history_dtype"),
    (dict(kronecker_beta=0.5), "kronecker_beta"),
    (dict(preconditioner="kronecker", kronecker_beta=1.5), "beta"),
])
def test_preconditioner_options_that_do_not_apply_are_errors(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ng.natural_galore(LR, rank=2, **kwargs)


def test_preconditioner_defaults_left_alone_are_accepted():
  defaults = inspect.signature(ng.natural_galore).parameters
  ng.natural_galore(LR, rank=2, preconditioner="kronecker",
                    history_size=defaults["history_size"].default,
                    history_dtype=defaults["history_dtype"].default)
  ng.natural_galore(LR, rank=2, kronecker_beta=0.95)
  assert ng.PRECONDITIONERS == ("woodbury", "kronecker")


@pytest.mark.parametrize("preconditioner", ng.PRECONDITIONERS)
def test_preconditioners_under_inject_hyperparams(preconditioner):
  static = ("rank", "update_proj_gap", "history_size", "oversampling", "power_iterations", "seed")
  options = dict(rank=2, update_proj_gap=2, preconditioner=preconditioner)
  injected = optax.inject_hyperparams(ng.natural_galore, static_args=static)(LR, **options)
  got, state = run(injected)
  want, _ = run(ng.natural_galore(LR, **options))
  assert float(state.hyperparams["kronecker_beta"]) == pytest.approx(0.95)
  for got_step, want_step in zip(got, want):
    for k in got_step:
      np.testing.assert_allclose(got_step[k], want_step[k], rtol=1e-5, atol=1e-7, err_msg=k)


def _state_bytes(tx, abstract_params):
  """Bytes of every array in ``tx``'s state, counted from the shapes alone."""
  state = jax.eval_shape(tx.init, abstract_params)
  return sum(leaf.size * jnp.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(state))


def test_defaults_hold_at_most_1_25x_galores_state_on_llama_1b():
  # The memory claim of the defaults, at the GaLore paper's LLaMA-1B rank: nothing allocated.
  _, abstract = llama.abstract_params(llama.CONFIGS["1b"])
  build = lambda alias, **kw: alias(1e-3, rank=512, mask=llama.galore_mask, **kw)
  galore = _state_bytes(build(ng.galore), abstract)
  natural = _state_bytes(build(ng.natural_galore), abstract)
  assert natural <= 1.25 * galore, natural / galore
  # The paper's setting (the smaller side, a float32 history of 10) is what the defaults avoid;
  # AdamW holds two full-size moments.
  paper = _state_bytes(build(ng.natural_galore, proj_type="std", history_size=10,
                             history_dtype=None), abstract)
  adamw = _state_bytes(optax.adamw(1e-3), abstract)
  assert paper > 3 * galore and natural < adamw / 2, (paper / galore, natural / adamw)


def test_galore_default_projects_onto_the_larger_side():
  # reverse_std: an (m, n) gradient gives r x min(m, n) coefficients, so Adam's moments in the
  # subspace are that shape; proj_type="std" (galore-torch) keeps r x max(m, n).
  params = {"tall": jnp.zeros((24, 8)), "wide": jnp.zeros((8, 24))}
  def moment_shapes(**kw):
    state = jax.eval_shape(ng.galore(LR, rank=2, **kw).init, params)
    mu = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(state)
          if "mu" in jax.tree_util.keystr(path) and leaf.ndim == 2]
    return sorted(sorted(leaf.shape) for leaf in mu)
  assert moment_shapes() == [[2, 8], [2, 8]]
  assert moment_shapes(proj_type="std") == [[2, 24], [2, 24]]
