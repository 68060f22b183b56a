"""proj_type="full" (two-sided projection) against float64 NumPy references.

The coefficients are ``C = U^T G V`` (``r x r``), with ``U`` and ``V`` the top-``r`` left and
right singular vectors of one SVD of the refresh gradient; the update is ``scale * U inner(C) V^T``.
A refresh moves inner state by ``R_l C R_r^T`` (``R_l = U_new^T U_old``, ``R_r = V_new^T V_old``),
a diagonal second moment by ``(R_l * R_l) v (R_r * R_r)^T``.

At a refresh, the coefficients of the gradient that was decomposed are ``diag(s)`` in exact
arithmetic, so their off-diagonal entries are rounding; an inner transformation that normalises
entry by entry (Adam with empty or reset moments) turns them into signs that no two
implementations share. The tests with such an inner use an Adam ``eps`` well above that rounding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ngalore_jax as ng


def svd_pair(matrix, rank):
  """float64 reference: the top-``rank`` left (m x r) and right (n x r) singular vectors."""
  u, _, vt = np.linalg.svd(np.asarray(matrix, np.float64), full_matrices=False)
  return u[:, :rank], vt[:rank].T


def align(reference, got):
  """Flips reference columns to the signs of ``got`` (singular vectors are defined up to sign)."""
  signs = np.sign(np.sum(reference * np.asarray(got, np.float64), axis=-2, keepdims=True))
  return reference * np.where(signs == 0, 1.0, signs)


def gradient_sequence(shape, steps, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return [(scale * rng.normal(size=shape)).astype(np.float32) for _ in range(steps)]


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


def numpy_adam(x, state, b1=0.9, b2=0.999, eps=1e-8):
  mu, nu, t = state
  t += 1
  mu = b1 * mu + (1 - b1) * x
  nu = b2 * nu + (1 - b2) * x ** 2
  return (mu / (1 - b1 ** t)) / (np.sqrt(nu / (1 - b2 ** t)) + eps), (mu, nu, t)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (8, 8), (4, 3)])
def test_projected_sgd_matches_reference_across_refreshes(shape):
  rank, gap, scale = 3, 3, 0.5
  m, n = shape
  r = min(rank, m, n)  # (4, 3): V is a square rotation, the column side is kept whole
  grads = gradient_sequence(shape, 7)
  tx = ng.galore_projection(optax.identity(), rank=rank, update_proj_gap=gap, scale=scale,
                            proj_type="full")
  updates, states = run(tx, grads)
  for t, (g, got) in enumerate(zip(grads, updates)):
    if t % gap == 0:
      u, v = svd_pair(g, r)
    want = scale * (u @ u.T @ g.astype(np.float64) @ v @ v.T)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"step {t}")
  assert [f.shape for f in states[-1].projectors["w"]] == [(m, r), (n, r)]
  adam_state = jax.eval_shape(
      ng.galore_projection(optax.scale_by_adam(), rank=rank, proj_type="full").init,
      {"w": jnp.zeros(shape)})
  assert adam_state.inner_states["w"].mu.shape == (r, r)


def woodbury_direction(history, damping):
  """(damping I + H H^T)^{-1} g for the last (current) entry g of ``history``, in float64."""
  h = np.stack([x.ravel() for x in history], axis=1)
  fisher = damping * np.eye(h.shape[0]) + h @ h.T
  return np.linalg.solve(fisher, h[:, -1]).reshape(history[-1].shape)


@pytest.mark.parametrize("shape", [(10, 4), (4, 10)])
@pytest.mark.parametrize("policy", ["keep", "reset", "rotate"])
def test_natural_gradient_and_adam_refresh_policies_match_reference(shape, policy):
  """The history rotates slot by slot on both sides, Adam's mu linearly and nu squared.

  Rank 3 (9 coefficients for 3 history slots): at rank 2 a refresh can rotate the history into
  a nearly orthogonal subspace, where the shrunken old gradients make the Gram matrix's
  condition number (~3e6) reach float32's resolution, below which the solve drops directions.
  """
  rank, gap, scale, size, damping, eps = 3, 3, 0.25, 3, 1e-3, 1e-2
  grads = gradient_sequence(shape, 8, seed=1)
  inner = optax.chain(ng.woodbury_precondition(history_size=size, damping=damping),
                      optax.scale_by_adam(eps=eps))
  tx = ng.galore_projection(inner, rank=rank, update_proj_gap=gap, scale=scale,
                            proj_type="full", refresh_policy=policy)
  updates, states = run(tx, grads)
  fresh = lambda: ([], (np.zeros((rank, rank)), np.zeros((rank, rank)), 0))
  history, adam = fresh()
  u = v = None
  for t, (g, got) in enumerate(zip(grads, updates)):
    if t % gap == 0:
      u_new, v_new = (align(ref, ours) for ref, ours in
                      zip(svd_pair(g, rank), states[t].projectors["w"]))
      if u is not None and policy == "reset":
        history, adam = fresh()
      if u is not None and policy == "rotate":
        left, right = u_new.T @ u, v_new.T @ v
        history = [left @ c @ right.T for c in history]
        mu, nu, count = adam
        adam = (left @ mu @ right.T, (left ** 2) @ nu @ (right ** 2).T, count)
      u, v = u_new, v_new
    coefficients = u.T @ g.astype(np.float64) @ v
    history = (history + [coefficients])[-size:]
    low_rank, adam = numpy_adam(woodbury_direction(history, damping), adam, eps=eps)
    want = scale * (u @ low_rank @ v.T)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=f"step {t}")


@pytest.mark.parametrize("shape,dims", [((3, 9, 4), ng.MatrixAxes(1, 2)),
                                        ((3, 4, 9), ng.MatrixAxes(2, 1))])
def test_stacked_matrices_rotate_per_layer(shape, dims):
  """A [layers, ...] leaf is a batch of matrices, each with its own U, V and rotations (the
  second case names the rows after the columns, so each matrix is a layer transposed)."""
  rank, gap, eps = 2, 2, 0.5
  grads = gradient_sequence(shape, 5, seed=3)
  tx = ng.galore_projection(optax.scale_by_adam(eps=eps), rank=rank, update_proj_gap=gap,
                            scale=1.0, proj_type="full", refresh_policy="rotate",
                            dimension_numbers=dims)
  updates, states = run(tx, grads)
  transposed = dims.reduction_axis == 2
  as_matrix = (lambda x: np.swapaxes(x, -1, -2)) if transposed else (lambda x: x)
  assert [f.shape for f in states[0].projectors["w"]] == [(3, 9, rank), (3, 4, rank)]
  for layer in range(shape[0]):
    adam = (np.zeros((rank, rank)), np.zeros((rank, rank)), 0)
    u = v = None
    for t, (g, got) in enumerate(zip(grads, updates)):
      matrix = as_matrix(g[layer].astype(np.float64))
      if t % gap == 0:
        factors = [f[layer] for f in states[t].projectors["w"]]
        u_new, v_new = (align(ref, ours) for ref, ours in zip(svd_pair(matrix, rank), factors))
        if u is not None:
          left, right = u_new.T @ u, v_new.T @ v
          mu, nu, count = adam
          adam = (left @ mu @ right.T, (left ** 2) @ nu @ (right ** 2).T, count)
        u, v = u_new, v_new
      low_rank, adam = numpy_adam(u.T @ matrix @ v, adam, eps=eps)
      np.testing.assert_allclose(as_matrix(got[layer]), u @ low_rank @ v.T, rtol=2e-4,
                                 atol=2e-5, err_msg=f"layer {layer}, step {t}")


class KroneckerReference:
  """L = beta L + (1 - beta) C C^T (rows) or C^T C (cols), bias-corrected, relative damping."""

  def __init__(self, side, beta=0.9, damping=1e-3, exponent=-0.5):
    self.side, self.beta, self.damping, self.exponent = side, beta, damping, exponent
    self.factor, self.count = 0.0, 0

  def step(self, c):
    c = c if self.side == "rows" else c.T
    self.factor = self.beta * self.factor + (1 - self.beta) * c @ c.T
    self.count += 1
    eigenvalues, eigenvectors = np.linalg.eigh(self.factor / (1 - self.beta ** self.count))
    eigenvalues = np.maximum(eigenvalues, 0.0)
    powered = (self.damping * eigenvalues[-1] + eigenvalues) ** self.exponent
    out = (eigenvectors * powered) @ eigenvectors.T @ c
    return out if self.side == "rows" else out.T


@pytest.mark.parametrize("side", ["rows", "cols"])
def test_kronecker_factor_rotates_with_its_own_side(side):
  """On ``r x r`` coefficients both sides are rank sides: rows follow R_l, columns R_r."""
  rank, gap = 3, 3
  grads = gradient_sequence((10, 6), 7, seed=4)
  tx = ng.galore_projection(ng.kronecker_precondition(beta=0.9, side=side), rank=rank,
                            update_proj_gap=gap, scale=1.0, proj_type="full",
                            refresh_policy="rotate")
  updates, states = run(tx, grads)
  reference = KroneckerReference(side)
  u = v = None
  for t, (g, got) in enumerate(zip(grads, updates)):
    if t % gap == 0:
      u_new, v_new = (align(ref, ours) for ref, ours in
                      zip(svd_pair(g, rank), states[t].projectors["w"]))
      if u is not None:
        rotation = u_new.T @ u if side == "rows" else v_new.T @ v
        reference.factor = rotation @ reference.factor @ rotation.T
      u, v = u_new, v_new
    want = u @ reference.step(u.T @ g.astype(np.float64) @ v) @ v.T
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3 * np.max(np.abs(want)),
                               err_msg=f"step {t}")


def test_randomized_svd_finds_both_dominant_subspaces():
  rng = np.random.default_rng(6)
  low_rank = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 40)) * 10
  matrix = (low_rank + 0.01 * rng.normal(size=(60, 40))).astype(np.float32)
  u, v = svd_pair(matrix, 4)
  tx = ng.galore_projection(optax.identity(), rank=4, proj_type="full",
                            svd_method="randomized", oversampling=4, power_iterations=1)
  _, states = run(tx, [matrix])
  for got, want in zip(states[0].projectors["w"], (u, v)):
    got = np.asarray(got, np.float64)
    np.testing.assert_allclose(got @ got.T, want @ want.T, atol=1e-4)


def test_refreshed_factors_keep_their_orientation():
  grads = gradient_sequence((9, 5), 6, seed=5)
  tx = ng.galore_projection(optax.identity(), rank=3, update_proj_gap=1, proj_type="full")
  _, states = run(tx, grads)
  for factor in (0, 1):
    bases = [np.asarray(s.projectors["w"][factor], np.float64) for s in states]
    assert np.all(bases[0].sum(axis=0) >= 0)
    for old, new in zip(bases, bases[1:]):
      assert np.all(np.sum(old * new, axis=0) >= 0), factor


def test_state_bytes_count_both_factors_as_projectors():
  params = {"w": jax.ShapeDtypeStruct((64, 48), jnp.float32),
            "b": jax.ShapeDtypeStruct((48,), jnp.float32)}
  rank, size = 8, 5
  tx = ng.natural_galore(1e-3, rank=rank, history_size=size, proj_type="full",
                         history_dtype=None)
  counts = ng.optimizer_state_bytes(jax.eval_shape(tx.init, params))
  assert counts["projectors"] == 4 * (64 + 48) * rank
  assert counts["history"] == 4 * size * rank * rank
  # Adam's moments on the r x r coefficients and its step count (plus the Woodbury count,
  # which is the inner state's too).
  assert counts["inner_state"] == 4 * 2 * rank * rank + 4 + 4


@pytest.mark.parametrize("dims,shape,match", [
    ({"w": "tucker"}, (6, 5), "marked 'tucker'"),
    ({"w": ng.MatrixAxes()}, (6,), "has no matrix"),
])
def test_full_refuses_leaves_it_cannot_project(dims, shape, match):
  tx = ng.galore_projection(optax.identity(), rank=2, proj_type="full", dimension_numbers=dims)
  with pytest.raises(ValueError, match=f"proj_type.*{match}"):
    tx.init({"w": jnp.zeros(shape)})


@pytest.mark.parametrize("make", [
    lambda: ng.fira(1e-3, rank=2, proj_type="full"),
    lambda: ng.apollo(1e-3, rank=2, proj_type="full"),
])
def test_one_sided_optimizers_refuse_full(make):
  # Fira and APOLLO scale per row or column of the full-size side, which "full" projects away.
  with pytest.raises(ValueError, match="proj_type"):
    make()


# name: (shape, parameter spec, projector specs (U, V), coefficient spec), at rank 4
SHARDED = {
    "tall": ((32, 16), P("fsdp", None), (P("fsdp", None), P(None, None)), P("fsdp", None)),
    "wide": ((16, 64), P(None, "fsdp"), (P(None, None), P("fsdp", None)), P(None, "fsdp")),
    "two_axes": ((16, 48), P("data", "fsdp"), (P("data", None), P("fsdp", None)),
                 P("data", "fsdp")),
    # rank clipped to 3, which neither mesh axis divides: replicated coefficients
    "clipped": ((3, 8), P(None, "fsdp"), (P(None, None), P("fsdp", None)), P(None, None)),
    # 4 stacked 8 x 12 matrices, batch over "data", rows over "fsdp"
    "stacked": ((4, 8, 12), P("data", "fsdp", None),
                (P("data", "fsdp", None), P("data", None, None)), P("data", "fsdp", None)),
}


def sharded_problem(seed):
  rng = np.random.default_rng(seed)
  values = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, *_) in SHARDED.items()}
  values["bias"] = rng.normal(size=(16,)).astype(np.float32)
  return values


def make_sharded_optimizer():
  # Adam's eps well above the refresh rounding (see the module docstring).
  return ng.natural_galore(1e-2, rank=4, update_proj_gap=2, history_size=3, proj_type="full",
                           refresh_policy="rotate", eps=1e-3,
                           dimension_numbers=ng.MatrixAxes(-2, -1))


@functools.cache
def sharded_problem_single_device_reference():
  """3 steps of ``make_sharded_optimizer()`` on one device (no mesh), once for both axis types.

  Jitted as one step (a fraction of the time of running it op by op).
  """
  reference_tx = make_sharded_optimizer()

  @jax.jit
  def step(params, state, grads):
    updates, state = reference_tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  reference = jax.tree.map(jnp.asarray, sharded_problem(0))
  reference_state = jax.jit(reference_tx.init)(reference)
  for t in range(3):
    reference, reference_state = step(reference, reference_state,
                                      jax.tree.map(jnp.asarray, sharded_problem(100 + t)))
  return reference


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_matches_single_device(axis_type):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  tx = make_sharded_optimizer()
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
  specs = {k: spec for k, (_, spec, *_) in SHARDED.items()}
  specs["bias"] = P()
  shardings = {k: NamedSharding(mesh, s) for k, s in specs.items()}
  params = jax.device_put(sharded_problem(0), shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, shardings)
  state_shardings = ng.state_shardings(tx, abstract)

  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    if axis_type == AxisType.Explicit:
      init, train_step = jax.jit(tx.init), jax.jit(step)
    else:
      init = jax.jit(tx.init, out_shardings=state_shardings)
      train_step = jax.jit(step, out_shardings=(shardings, state_shardings))
    state = init(params)
    for t in range(3):
      params, state = train_step(params, state, jax.device_put(sharded_problem(100 + t),
                                                               shardings))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.spec, s.spec), state,
                 state_shardings)
  projection = state[0].inner_states["galore"].inner_state
  for name, (_, _, factor_specs, coefficient_spec) in SHARDED.items():
    assert tuple(f.sharding.spec for f in projection.projectors[name]) == factor_specs, name
    woodbury, adam = projection.inner_states[name]
    assert adam.mu.sharding.spec == coefficient_spec, name
    assert woodbury.history.sharding.spec == P(None, *coefficient_spec), name

  reference = sharded_problem_single_device_reference()
  for k in reference:
    np.testing.assert_allclose(np.asarray(params[k]), np.asarray(reference[k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)
