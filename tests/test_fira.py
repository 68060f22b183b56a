"""ng.fira against the authors' FiraAdamW (fira 1.0.2, torch on CPU), and in the library's settings.

The reference and ng.fira see the same fixed gradient sequence (not gradients of the evolving
weights), over several projector refreshes, for tall, wide and square matrices, a matrix whose
rank is clipped to its smaller side, and a 1-D leaf. Both projectors are top-r singular vectors,
which are defined only up to sign; within one projector interval the signs cancel, and across
refreshes (FiraAdamW keeps Adam's moments, ng's ``refresh_policy="keep"``) the reference's
vectors are flipped to ng's signs at each refresh, a gauge choice the test checks is only that:
each of ng's vectors is, up to sign, the reference's.

Tolerances (on the displacement p_t - p_0, entries ~1e-2..1e-1): rtol 1e-4, atol 1e-6 for the
matrices (float32 rounding in the SVD, projections, norms and limiter; measured <= 1e-5
relative). The 1-D leaf gets the library's plain Adam, which adds ``eps`` to the bias-corrected
``sqrt(nu_hat)`` where the authors add it to ``sqrt(nu)``: at their ``eps=1e-6`` that moves its
steps by ~eps / sqrt(1 - b2^t) / |g| ~ 1e-4 relative, hence rtol 1e-3 there (1e-4 at eps=1e-8).
"""

import importlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ngalore_jax as ng

LR, RANK, GAP, STEPS = 1e-2, 4, 5, 16  # refreshes at steps 0, 5, 10, 15
SHAPES = {"tall": (12, 5), "wide": (5, 11), "square": (6, 6), "tall_clipped": (9, 3),
          "bias": (7,)}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def fira_torch():
  pytest.importorskip("torch", reason="torch is the reference here (dev extra)")
  try:
    adamw = importlib.import_module("fira.fira_adamw")
    projection = importlib.import_module("fira.gradient_projection")
  except ImportError as e:
    pytest.skip(f"fira is not installed or does not import here: {e}")
  return adamw.AdamW, projection.GradientProjector


def make_problem(seed=0, param_scale=0.1):
  rng = np.random.default_rng(seed)
  params = {k: (param_scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(STEPS)]
  return params, grads


def projection_state(state):
  is_projection = lambda x: isinstance(x, ng.GaLoreProjectionState)
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_projection) if is_projection(s)]
  return found


def run_ng(tx, params0, grads):
  """Per step: the parameters after it, and the projectors used at it."""
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  trajectory, projectors = [], []
  for g in grads:
    updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append({k: np.asarray(v) for k, v in params.items()})
    projectors.append({k: np.asarray(f[0])
                       for k, f in projection_state(state).projectors.items() if f})
  assert step._cache_size() == 1
  return trajectory, projectors


def run_reference(fira_torch, params0, grads, *, scale, eps, weight_decay=0.0,
                  ng_projectors=None, monkeypatch=None):
  """FiraAdamW ('std' projection on the matrices, its AdamW on the rest); with
  ``ng_projectors``, each refreshed basis is sign-aligned to ng's at that step."""
  import torch  # pylint: disable=import-outside-toplevel
  adamw, projector = fira_torch
  params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params0.items()}
  groups = [{"params": [params[k] for k in MATRICES], "rank": RANK, "update_proj_gap": GAP,
             "alpha": scale, "proj_type": "std"},
            {"params": [params["bias"]]}]
  optimizer = adamw(groups, lr=LR, eps=eps, weight_decay=weight_decay,
                    no_deprecation_warning=True)
  seen, step = [], [0]
  if ng_projectors is not None:
    original = projector.get_orthogonal_matrix
    names = {SHAPES[k]: k for k in MATRICES}

    def aligned(self, weights, rank, type):  # noqa: A002 (the authors' argument name)
      basis = original(self, weights, rank, type)
      columns = basis.T if type == "right" else basis  # right: Vh[:r], [r, n]
      name = names[tuple(weights.shape)]
      target = ng_projectors[step[0]][name]
      overlap = np.sum(columns.numpy().astype(np.float64) * target, axis=0)
      seen.append((step[0], name, np.abs(overlap)))
      signs = torch.tensor(np.where(overlap < 0, -1.0, 1.0).astype(np.float32))
      return basis * signs[:, None] if type == "right" else basis * signs[None, :]

    monkeypatch.setattr(projector, "get_orthogonal_matrix", aligned)
  trajectory = []
  for t, g in enumerate(grads):
    step[0] = t
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    optimizer.step()
    trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
  return trajectory, seen


def assert_close(got, want, params0, *, bias_rtol, steps=None):
  for t in range(len(want)) if steps is None else steps:
    for k in SHAPES:
      np.testing.assert_allclose(got[t][k] - params0[k], want[t][k] - params0[k],
                                 rtol=RTOL if k in MATRICES else bias_rtol, atol=ATOL,
                                 err_msg=f"step {t}, leaf {k!r}")


def max_difference(a, b):
  return max(float(np.max(np.abs(a[-1][k] - b[-1][k]))) for k in SHAPES)


def test_matches_fira_within_the_first_projector_interval(fira_torch):
  """No sign alignment: within an interval the SVD's signs cancel. The authors' defaults
  (eps 1e-6) and their pre-training scripts' alpha 0.25."""
  params0, grads = make_problem()
  tx = ng.fira(LR, rank=RANK, update_proj_gap=GAP, scale=0.25, refresh_policy="keep")
  got, _ = run_ng(tx, params0, grads[:GAP])
  want, _ = run_reference(fira_torch, params0, grads[:GAP], scale=0.25, eps=1e-6)
  assert_close(got, want, params0, bias_rtol=1e-3)


@pytest.mark.parametrize("scale, eps, bias_rtol", [(0.25, 1e-6, 1e-3), (1.0, 1e-8, RTOL)])
def test_matches_fira_across_refreshes(fira_torch, monkeypatch, scale, eps, bias_rtol):
  params0, grads = make_problem()
  tx = ng.fira(LR, rank=RANK, update_proj_gap=GAP, scale=scale, eps=eps, refresh_policy="keep")
  got, ng_projectors = run_ng(tx, params0, grads)
  want, seen = run_reference(fira_torch, params0, grads, scale=scale, eps=eps,
                             ng_projectors=ng_projectors, monkeypatch=monkeypatch)
  # The reference refreshed at the same steps, to the same singular vectors (up to sign).
  assert sorted({(t, k) for t, k, _ in seen}) == sorted(
      (t, k) for t in range(0, STEPS, GAP) for k in MATRICES)
  for t, k, overlap in seen:
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4, err_msg=f"step {t}, leaf {k!r}")
  assert_close(got, want, params0, bias_rtol=bias_rtol)
  if scale != 1.0:
    return
  # What was compared depends on the limiter and on the residual term: without either, the
  # trajectory moves by far more than the tolerance.
  no_limiter, _ = run_ng(ng.fira(LR, rank=RANK, update_proj_gap=GAP, scale=scale, eps=eps,
                                 refresh_policy="keep", norm_growth_limit=None),
                         params0, grads)
  galore, _ = run_ng(ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=scale, eps=eps,
                               refresh_policy="keep"), params0, grads)
  assert max_difference(no_limiter, got) > 1e3 * ATOL
  assert max_difference(galore, got) > 1e3 * ATOL


def test_weight_decay_matches_fira_up_to_its_decay_order(fira_torch, monkeypatch):
  """FiraAdamW decays the updated weights, p <- (1 - lr wd)(p - lr u); optax the current ones,
  q <- q - lr u - lr wd q. The updates u do not depend on the weights here, so both recurrences
  are computed in NumPy from the reference's undecayed increments: the reference with decay
  must follow the first, ng.fira with decay the second."""
  wd = 0.5
  params0, grads = make_problem(param_scale=1.0)
  got, ng_projectors = run_ng(ng.fira(LR, rank=RANK, update_proj_gap=GAP, eps=1e-8,
                                      weight_decay=wd, refresh_policy="keep"), params0, grads)
  kwargs = dict(scale=0.25, eps=1e-8, ng_projectors=ng_projectors, monkeypatch=monkeypatch)
  decayed, _ = run_reference(fira_torch, params0, grads, weight_decay=wd, **kwargs)
  undecayed, _ = run_reference(fira_torch, params0, grads, **kwargs)
  p = {k: v.astype(np.float64) for k, v in params0.items()}
  q = dict(p)
  torch_order, optax_order = [], []
  previous = params0
  for t in range(STEPS):
    increment = {k: undecayed[t][k].astype(np.float64) - previous[k] for k in SHAPES}
    previous = undecayed[t]
    p = {k: (1 - LR * wd) * (p[k] + increment[k]) for k in SHAPES}
    q = {k: q[k] + increment[k] - LR * wd * q[k] for k in SHAPES}
    torch_order.append(p)
    optax_order.append(q)
  assert_close(decayed, torch_order, params0, bias_rtol=RTOL)
  assert_close(got, optax_order, params0, bias_rtol=RTOL)
  assert max_difference(decayed, undecayed) > 1e-2  # the decay itself is large


# -- the library's settings ---------------------------------------------------------------------


def test_stacked_matrices_get_one_projector_and_one_limiter_each():
  """A [3, 12, 5] leaf equals three 12 x 5 leaves: projector, Adam, norm ratios and limiter are
  per matrix (an independent computation: three unbatched runs)."""
  rng = np.random.default_rng(1)
  grads = [rng.normal(size=(3, 12, 5)).astype(np.float32) for _ in range(7)]
  tx = ng.scale_by_fira(rank=2, update_proj_gap=3, refresh_policy="keep")
  stacked_state = tx.init({"w": jnp.zeros((3, 12, 5))})
  split_state = tx.init({f"w{i}": jnp.zeros((12, 5)) for i in range(3)})
  assert stacked_state.inner_states["w"].residual_norm.shape == (3,)
  step = jax.jit(tx.update)
  for g in grads:
    stacked, stacked_state = step({"w": jnp.asarray(g)}, stacked_state)
    split, split_state = step({f"w{i}": jnp.asarray(g[i]) for i in range(3)}, split_state)
    for i in range(3):
      np.testing.assert_allclose(stacked["w"][i], split[f"w{i}"], rtol=1e-5, atol=1e-6)


def test_state_memory_per_matrix():
  """Projector r x min(m, n), Adam's moments 2 x r x max(m, n), one limiter norm and one counter
  per matrix (inner_state); the plain-Adam leaf and the counters elsewhere in "other"."""
  r, f32 = 8, 4
  shapes = {"a": (64, 16), "b": (16, 48), "c": (32,)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  got = ng.optimizer_state_bytes(jax.eval_shape(ng.fira(1e-3, rank=r).init, params))
  matrices = [s for s in shapes.values() if len(s) == 2]
  assert got["projectors"] == sum(r * min(s) * f32 for s in matrices)
  assert got["inner_state"] == sum((2 * r * max(s) + 2) * f32 for s in matrices)
  # Adam's count and 2 x 32 moments for "c"; the projection's count.
  assert got["other"] == (1 + 2 * 32) * f32 + f32
  assert got["history"] == got["curvature"] == 0


@pytest.mark.parametrize("policy", ["rotate", "reset"])
def test_refresh_policies_and_the_update_against_numpy(policy):
  """At a refresh, 'rotate' moves Adam's moments into the new basis like optax's Adam state
  (mu by R = P_new^T P_old, nu by R * R; the limiter's norm stays), 'reset' restarts the state
  and the limiter with it. The update is then recomputed in NumPy from the formula
  s_t (alpha P N + S / max(1, ||S|| / (1.01 ||S_prev||))), S = phi * (G - alpha P P^T G)."""
  alpha, eps = 1.0, 1e-6
  rng = np.random.default_rng(2)
  # The first two gradients are nearly rank 3 (a small residual), the last is not: under
  # 'rotate' the limiter has to act on it.
  low_rank = lambda: rng.normal(size=(10, 3)) @ rng.normal(size=(3, 6))
  grads = [{"w": jnp.asarray((low_rank() + noise * rng.normal(size=(10, 6))).astype(np.float32))}
           for noise in (0.1, 0.1, 1.0)]
  tx = ng.scale_by_fira(rank=3, update_proj_gap=2, scale=alpha, eps=eps, refresh_policy=policy)
  state = tx.init({"w": jnp.zeros((10, 6))})
  step = jax.jit(tx.update)
  for g in grads[:2]:
    _, state = step(g, state)
  update, new_state = step(grads[2], state)
  old, new = state.inner_states["w"], new_state.inner_states["w"]
  p_old = np.asarray(state.projectors["w"][0], np.float64)
  p_new = np.asarray(new_state.projectors["w"][0], np.float64)
  assert np.max(np.abs(p_new.T @ p_old - np.eye(3))) > 0.1  # the basis did change
  g = np.asarray(grads[2]["w"], np.float64)
  c = g @ p_new  # 'std' on a tall matrix: right projection, coefficients 10 x r
  if policy == "rotate":
    rotation = p_new.T @ p_old
    mu = 0.9 * (np.asarray(old.mu) @ rotation.T) + 0.1 * c
    nu = 0.999 * (np.asarray(old.nu) @ (rotation ** 2).T) + 0.001 * c ** 2
    t, previous = 3, float(old.residual_norm)
  else:
    mu, nu, t, previous = 0.1 * c, 0.001 * c ** 2, 1, None
  np.testing.assert_allclose(new.mu, mu, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.nu, nu, rtol=1e-4, atol=1e-7)
  assert int(new.count) == t
  direction = mu / (np.sqrt(nu) + eps)
  phi = np.linalg.norm(direction, axis=1) / (np.linalg.norm(c, axis=1) + 1e-8)
  scaled = (g - alpha * c @ p_new.T) * phi[:, None]
  norm = np.linalg.norm(scaled)
  limiter = 1.0 if previous is None else max(norm / (previous + 1e-8), 1.01) / 1.01
  if policy == "rotate":
    assert limiter > 1.05  # the limiter acts at this step
  step = np.sqrt(1 - 0.999 ** t) / (1 - 0.9 ** t)
  want = step * (alpha * direction @ p_new.T + scaled / limiter)
  np.testing.assert_allclose(update["w"], want, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(new.residual_norm, norm / limiter, rtol=1e-5)


def test_bfloat16_params_keep_their_dtype_with_one_compilation():
  params = {"w": jnp.ones((12, 5), jnp.bfloat16), "b": jnp.zeros((5,), jnp.bfloat16)}
  tx = ng.fira(LR, rank=2, update_proj_gap=2)
  state = initial = tx.init(params)
  step = jax.jit(tx.update)
  for seed in range(3):
    g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(seed), p.shape, p.dtype), params)
    updates, state = step(g, state, params)
    params = optax.apply_updates(params, updates)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves((updates, params)))
    chex.assert_trees_all_equal_shapes_and_dtypes(state, initial)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
  assert step._cache_size() == 1


def test_inject_hyperparams_learning_rate_and_scale():
  static = ("rank", "update_proj_gap", "oversampling", "power_iterations", "seed")
  tx = optax.inject_hyperparams(ng.fira, static_args=static)(
      learning_rate=LR, rank=2, update_proj_gap=2)
  params = {"w": jnp.ones((12, 5)), "b": jnp.zeros((5,))}
  state_a, state_b = tx.init(params), tx.init(params)  # (hyperparams is a mutable dict)
  step = jax.jit(tx.update)
  g = {"w": jnp.asarray(np.random.default_rng(3).normal(size=(12, 5)), jnp.float32),
       "b": jnp.ones((5,))}
  state_b.hyperparams["learning_rate"] = jnp.asarray(2 * LR, jnp.float32)
  updates_a, state_a = step(g, state_a, params)
  updates_b, state_b = step(g, state_b, params)
  for k in params:
    np.testing.assert_allclose(updates_b[k], 2 * updates_a[k], rtol=1e-6)
  state_b.hyperparams["scale"] = jnp.asarray(1.0, jnp.float32)  # a traced scale changes the update
  updates_c, _ = step(g, state_b, params)
  assert step._cache_size() == 1
  assert not np.allclose(updates_c["w"], updates_b["w"], rtol=1e-3)


def test_inside_nnx_optimizer_matches_the_optax_loop():
  class Net(nnx.Module):

    def __init__(self, *, rngs):
      self.dense = nnx.Linear(6, 10, rngs=rngs)
      self.stack = nnx.Param(jax.random.normal(rngs.params(), (2, 10, 4)) * 0.3)

    def __call__(self, x):
      h = jnp.tanh(self.dense(x))
      return jnp.einsum("bi,kio->bko", h, self.stack[...])

  x = jnp.asarray(np.random.default_rng(4).normal(size=(8, 6)), jnp.float32)
  loss = lambda m: jnp.mean(m(x) ** 2)
  make_tx = lambda: ng.fira(LR, rank=2, update_proj_gap=2, weight_decay=0.1)
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

  @nnx.jit
  def nnx_step(model, optimizer):
    value, grads = nnx.value_and_grad(loss)(model)
    optimizer.update(model, grads)
    return value

  graph, params = nnx.split(Net(rngs=nnx.Rngs(0)), nnx.Param)
  tx = make_tx()
  state = tx.init(params)

  @jax.jit
  def optax_step(params, state):
    value, grads = jax.value_and_grad(lambda p: loss(nnx.merge(graph, p)))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, value

  nnx_losses, optax_losses = [], []
  for _ in range(5):  # refreshes at 0, 2, 4
    nnx_losses.append(float(nnx_step(model, optimizer)))
    params, state, value = optax_step(params, state)
    optax_losses.append(float(value))
  np.testing.assert_allclose(nnx_losses, optax_losses, rtol=1e-5)
  assert nnx_losses[-1] < nnx_losses[0]
  assert ng.optimizer_state_bytes(optimizer.opt_state) == ng.optimizer_state_bytes(state)


def test_sharded_on_an_explicit_2x4_mesh_matches_one_device():
  # Low-rank state split like the rows (tall), moved to the full-size columns (moved), split on
  # the rank (indivisible: 18 columns over 4 devices); both mesh axes on one weight (two_axes).
  specs = {"tall": ((32, 16), P("fsdp", None)), "moved": ((12, 40), P("fsdp", None)),
           "indivisible": ((8, 18), P("fsdp", None)), "two_axes": ((16, 48), P("data", "fsdp")),
           "bias": ((16,), P())}
  rng = np.random.default_rng(5)
  params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in specs.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, (s, _) in specs.items()}
           for _ in range(3)]
  make_tx = lambda: ng.fira(LR, rank=4, update_proj_gap=2, weight_decay=0.1)
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(AxisType.Explicit,) * 2)
  shardings = {k: NamedSharding(mesh, spec) for k, (_, spec) in specs.items()}
  abstract = {k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=shardings[k])
              for k, (s, _) in specs.items()}
  tx = make_tx()
  expected = ng.state_shardings(tx, abstract)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    sharded = jax.device_put(params, shardings)
    state = jax.jit(tx.init)(sharded)
    for g in grads:
      sharded, state = step(sharded, state, jax.device_put(g, shardings))
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.spec, s.spec), state, expected)
  fira_states = projection_state(state).inner_states
  assert fira_states["tall"].mu.sharding.spec == P("fsdp", None)  # 32 x r, split like the rows
  reference_tx = make_tx()
  reference = {k: jnp.asarray(v) for k, v in params.items()}
  reference_state = reference_tx.init(reference)
  reference_step = jax.jit(reference_tx.update)
  for g in grads:
    updates, reference_state = reference_step(jax.tree.map(jnp.asarray, g), reference_state,
                                              reference)
    reference = optax.apply_updates(reference, updates)
  for k in specs:
    np.testing.assert_allclose(np.asarray(sharded[k]), reference[k], rtol=1e-5, atol=1e-6,
                               err_msg=k)


@pytest.mark.parametrize("build, argument", [
    (lambda: ng.fira(LR, rank=0), "rank"),
    (lambda: ng.fira(LR, rank=4, update_proj_gap=0), "update_proj_gap"),
    (lambda: ng.fira(LR, scale=0.0), "scale"),
    (lambda: ng.fira(LR, scale=float("nan")), "scale"),
    (lambda: ng.scale_by_fira(rank=4, scale=float("inf")), "scale"),
    (lambda: ng.fira(LR, norm_growth_limit=0.5), "norm_growth_limit"),
    (lambda: ng.fira(LR, norm_growth_limit=float("inf")), "norm_growth_limit"),
    (lambda: ng.fira(LR, b2=1.0), "b2"),
    (lambda: ng.fira(LR, eps=-1.0), "eps"),
    (lambda: ng.fira(LR, proj_type="full"), "proj_type"),
    (lambda: ng.fira(LR, refresh_policy="forget"), "refresh_policy"),
])
def test_bad_arguments_raise_value_error_naming_them(build, argument):
  with pytest.raises(ValueError, match=rf"\b{argument}\b"):
    build()


def test_a_tucker_leaf_is_refused_with_a_clear_error():
  tx = ng.scale_by_fira(rank=2, dimension_numbers={"w": "tucker"})
  state = tx.init({"w": jnp.zeros((4, 5, 6))})
  with pytest.raises(ValueError, match="MatrixAxes"):
    jax.eval_shape(tx.update, {"w": jnp.ones((4, 5, 6))}, state)
