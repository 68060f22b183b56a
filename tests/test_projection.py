"""galore_projection against NumPy float64 references of GaLore's formulas."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng


def top_singular_basis(matrix, rank, side):
  """float64 reference basis: left (m x r) or right (n x r) singular vectors."""
  u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return u[:, :rank] if side == "left" else vt[:rank].T


def align_signs(reference, got):
  """Flips reference columns to the signs of ``got`` (singular vectors are defined up to sign)."""
  signs = np.sign(np.sum(reference * np.asarray(got, np.float64), axis=-2, keepdims=True))
  return reference * np.where(signs == 0, 1.0, signs)


def expected_side(proj_type, m, n):
  return {"std": "right" if m >= n else "left", "reverse_std": "left" if m >= n else "right",
          "left": "left", "right": "right"}[proj_type]


def gradient_sequence(shape, steps, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.normal(size=shape).astype(np.float32) for _ in range(steps)]


def run(tx, grads):
  """Applies ``tx`` to a fixed gradient sequence; returns updates and states per step."""
  state = tx.init({"w": jnp.zeros(grads[0].shape)})
  step = jax.jit(tx.update)
  updates, states = [], []
  for g in grads:
    u, state = step({"w": jnp.asarray(g)}, state)
    updates.append(np.asarray(u["w"], np.float64))
    states.append(state)
  return updates, states


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8), (4, 3)])
@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right"])
def test_projected_sgd_matches_reference_across_refreshes(shape, proj_type):
  rank, gap, scale = 3, 3, 0.5
  m, n = shape
  side = expected_side(proj_type, m, n)
  r = min(rank, m, n)
  grads = gradient_sequence(shape, 7)
  tx = ng.galore_projection(optax.identity(), rank=rank, update_proj_gap=gap, scale=scale,
                            proj_type=proj_type)
  updates, states = run(tx, grads)
  coefficient_shape = (r, n) if side == "left" else (m, r)
  basis = None
  for t, (g, got) in enumerate(zip(grads, updates)):
    if t % gap == 0:
      basis = top_singular_basis(g, r, side)
    g64 = g.astype(np.float64)
    want = scale * (basis @ basis.T @ g64 if side == "left" else g64 @ basis @ basis.T)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  projector = np.asarray(states[-1].projectors["w"][0])
  assert projector.shape == ((m if side == "left" else n), r)
  adam_state = jax.eval_shape(
      ng.galore_projection(optax.scale_by_adam(), rank=rank, proj_type=proj_type).init,
      {"w": jnp.zeros(shape)})
  assert adam_state.inner_states["w"].mu.shape == coefficient_shape


def numpy_adam(coefficients, state, b1=0.9, b2=0.999, eps=1e-8):
  mu, nu, t = state
  t += 1
  mu = b1 * mu + (1 - b1) * coefficients
  nu = b2 * nu + (1 - b2) * coefficients ** 2
  update = (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps)
  return update, (mu, nu, t)


@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_projected_adam_refresh_policies_match_reference(shape, policy):
  rank, gap, scale = 2, 3, 0.25
  m, n = shape
  side = expected_side("std", m, n)
  grads = gradient_sequence(shape, 8, seed=1)
  tx = ng.galore_projection(optax.scale_by_adam(), rank=rank, update_proj_gap=gap, scale=scale,
                            refresh_policy=policy)
  updates, states = run(tx, grads)
  coefficient_shape = (rank, n) if side == "left" else (m, rank)
  adam = (np.zeros(coefficient_shape), np.zeros(coefficient_shape), 0)
  basis = None
  for t, (g, got) in enumerate(zip(grads, updates)):
    g64 = g.astype(np.float64)
    if t % gap == 0:
      new_basis = align_signs(top_singular_basis(g, rank, side), states[t].projectors["w"][0])
      if basis is not None and policy == "reset":
        adam = (np.zeros(coefficient_shape), np.zeros(coefficient_shape), 0)
      if basis is not None and policy == "rotate":
        rotation = new_basis.T @ basis
        mu, nu, count = adam
        if side == "left":
          adam = (rotation @ mu, (rotation ** 2) @ nu, count)
        else:
          adam = (mu @ rotation.T, nu @ (rotation ** 2).T, count)
      basis = new_basis
    coefficients = basis.T @ g64 if side == "left" else g64 @ basis
    low_rank, adam = numpy_adam(coefficients, adam)
    want = scale * (basis @ low_rank if side == "left" else low_rank @ basis.T)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"step {t}")


def test_tucker_projection_of_a_3d_leaf_matches_hosvd():
  shape, rank = (6, 5, 2), 3  # the last mode (2 <= rank) is left unprojected
  grads = gradient_sequence(shape, 4, seed=2)
  tx = ng.galore_projection(optax.identity(), rank=rank, update_proj_gap=2, scale=1.0)
  updates, states = run(tx, grads)
  assert [f.shape for f in states[0].projectors["w"]] == [(6, 3), (5, 3)]
  for t, (g, got) in enumerate(zip(grads, updates)):
    if t % 2 == 0:
      g64 = g.astype(np.float64)
      factors = [top_singular_basis(np.moveaxis(g64, mode, 0).reshape(shape[mode], -1), rank,
                                    "left") for mode in (0, 1)]
    want = np.einsum("ai,bj,ijk->abk", factors[0] @ factors[0].T, factors[1] @ factors[1].T,
                     g.astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_stacked_layers_are_a_batch_of_matrices():
  layers = gradient_sequence((3, 9, 4), 1, seed=3)[0]
  tx = ng.galore_projection(optax.identity(), rank=2, scale=1.0,
                            dimension_numbers=ng.MatrixAxes(1, 2))
  (got,), states = run(tx, [layers])
  assert states[0].projectors["w"][0].shape == (3, 4, 2)  # per layer: the smaller side, n x r
  for layer, got_layer in zip(layers, got):
    basis = top_singular_basis(layer, 2, "right")
    np.testing.assert_allclose(got_layer, layer.astype(np.float64) @ basis @ basis.T,
                               rtol=1e-4, atol=1e-5)


def test_matrix_axes_merge_several_axes():
  # An attention kernel stored as [embed, heads, head_dim]: rows = embed, cols = heads*head_dim.
  kernel = gradient_sequence((6, 2, 4), 1, seed=4)[0]
  dims = {"w": ng.MatrixAxes(reduction_axis=0, output_axis=(1, 2))}
  tx = ng.galore_projection(optax.identity(), rank=3, scale=1.0, dimension_numbers=dims)
  (got,), _ = run(tx, [kernel])
  matrix = kernel.reshape(6, 8).astype(np.float64)
  basis = top_singular_basis(matrix, 3, "left")  # 6 < 8: the smaller side is the rows
  np.testing.assert_allclose(got, (basis @ basis.T @ matrix).reshape(6, 2, 4), rtol=1e-4,
                             atol=1e-5)


def test_unprojected_leaves_reach_inner_at_full_size():
  tx = ng.galore_projection(optax.scale_by_adam(), rank=2,
                            dimension_numbers={"w": None, "b": None})
  params = {"w": jnp.zeros((5, 4)), "b": jnp.zeros((3,))}
  state = tx.init(params)
  assert state.inner_states["w"].mu.shape == (5, 4) and state.projectors["w"] == ()
  grads = {"w": jnp.ones((5, 4)), "b": -jnp.ones((3,))}
  updates, _ = tx.update(grads, state)
  want, _ = optax.scale_by_adam().update(grads, optax.scale_by_adam().init(params))
  np.testing.assert_allclose(updates["w"], want["w"], rtol=1e-6)
  np.testing.assert_allclose(updates["b"], want["b"], rtol=1e-6)


def test_randomized_svd_finds_the_dominant_subspace():
  rng = np.random.default_rng(5)
  low_rank = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 40)) * 10
  matrix = (low_rank + 0.01 * rng.normal(size=(60, 40))).astype(np.float32)
  exact = top_singular_basis(matrix, 4, "left")
  for method in ("exact", "randomized"):
    tx = ng.galore_projection(optax.identity(), rank=4, proj_type="left", svd_method=method,
                              oversampling=4, power_iterations=1)
    _, states = run(tx, [matrix])
    basis = np.asarray(states[0].projectors["w"][0], np.float64)
    np.testing.assert_allclose(basis @ basis.T, exact @ exact.T, atol=1e-4)


def test_staggered_refreshes_spread_over_the_gap():
  gap = 4
  shapes = {"a": (6, 3), "b": (6, 3), "c": (6, 3), "d": (6, 3)}
  tx = ng.galore_projection(optax.identity(), rank=1, update_proj_gap=gap, stagger_refresh=True)
  state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
  step = jax.jit(tx.update)
  rng = np.random.default_rng(6)
  refreshed = {k: [] for k in shapes}
  previous = None
  for t in range(9):
    grads = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in shapes.items()}
    _, state = step(grads, state)
    for k in shapes:
      current = np.asarray(state.projectors[k][0])
      if previous is None or not np.allclose(current, previous[k]):
        refreshed[k].append(t)
    previous = {k: np.asarray(state.projectors[k][0]) for k in shapes}
  # Leaf j (of 4) is shifted by j * gap // 4 = j steps: it refreshes at t = 0 and t = -j mod 4.
  assert refreshed == {"a": [0, 4, 8], "b": [0, 3, 7], "c": [0, 2, 6], "d": [0, 1, 5]}


def test_rotate_rejects_state_it_does_not_know():
  class Sums(NamedTuple):
    total: jax.Array

  unknown = optax.GradientTransformation(
      lambda p: Sums(jnp.zeros_like(p)),
      lambda u, s, p=None: (u, Sums(s.total + u)))
  tx = ng.galore_projection(unknown, rank=2, refresh_policy="rotate")
  state = tx.init({"w": jnp.zeros((6, 4))})
  with pytest.raises(ValueError, match="refresh_policy='rotate' does not know"):
    tx.update({"w": jnp.ones((6, 4))}, state)


def test_rotate_moves_momentum_and_rms_state_into_the_new_basis():
  # optax.sgd momentum (linear) and RMSProp's nu (quadratic): first refresh at step 1.
  rng = np.random.default_rng(8)
  grads = [rng.normal(size=(7, 3)).astype(np.float32) for _ in range(2)]
  for inner, field, squared in ((optax.trace(decay=0.5), "trace", False),
                                (optax.scale_by_rms(decay=0.5), "nu", True)):
    tx = ng.galore_projection(inner, rank=2, update_proj_gap=1, refresh_policy="rotate")
    _, states = run(tx, grads)
    old = np.asarray(states[0].projectors["w"][0], np.float64)
    new = np.asarray(states[1].projectors["w"][0], np.float64)
    rotation = new.T @ old
    carried = np.asarray(getattr(states[0].inner_states["w"], field), np.float64)
    carried = carried @ ((rotation ** 2).T if squared else rotation.T)  # right projection
    coefficients = grads[1].astype(np.float64) @ new
    want = (0.5 * carried + coefficients if not squared
            else 0.5 * carried + 0.5 * coefficients ** 2)
    np.testing.assert_allclose(getattr(states[1].inner_states["w"], field), want, rtol=1e-4,
                               atol=1e-6)


def test_inner_that_needs_params_fails_clearly():
  inner = optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1e-2))
  tx = ng.galore_projection(inner, rank=2)
  params = {"w": jnp.ones((6, 4))}
  with pytest.raises(ValueError, match="add_decayed_weights"):
    tx.update({"w": jnp.ones((6, 4))}, tx.init(params), params)


@pytest.mark.parametrize("kwargs,name", [
    (dict(rank=0), "rank"), (dict(rank=2, update_proj_gap=0), "update_proj_gap"),
    (dict(rank=2, proj_type="diagonal"), "proj_type"),
    (dict(rank=2, refresh_policy="forget"), "refresh_policy"),
    (dict(rank=2, svd_method="qr"), "svd_method"), (dict(rank=2, oversampling=-1), "oversampling"),
    (dict(rank=2.5), "rank")])
def test_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    ng.galore_projection(optax.identity(), **kwargs)


def test_bf16_gradients_keep_dtype_and_projector_dtype_option():
  tx = ng.galore_projection(optax.scale_by_adam(), rank=2, projector_dtype=jnp.float32)
  state = tx.init({"w": jnp.zeros((6, 4), jnp.bfloat16)})
  updates, state = tx.update({"w": jnp.ones((6, 4), jnp.bfloat16)}, state)
  assert updates["w"].dtype == jnp.bfloat16
  assert state.projectors["w"][0].dtype == jnp.float32
  assert state.inner_states["w"].mu.dtype == jnp.bfloat16


def test_refreshed_bases_keep_their_orientation():
  # SVD signs are arbitrary; each refreshed vector must point the way its predecessor did (and
  # the first ones must have a non-negative entry sum), or "keep" would depend on the backend.
  grads = gradient_sequence((10, 4), 10, seed=7)
  tx = ng.galore_projection(optax.identity(), rank=3, update_proj_gap=1)
  _, states = run(tx, grads)
  bases = [np.asarray(s.projectors["w"][0], np.float64) for s in states]
  assert np.all(bases[0].sum(axis=0) >= 0)
  for old, new in zip(bases, bases[1:]):
    assert np.all(np.sum(old * new, axis=0) >= 0)
