"""ng.apollo / ng.apollo_mini against the authors' APOLLOAdamW (apollo-torch 1.0.3, torch on CPU).

``projection="svd"`` is deterministic and compared as it is (with the sign gauge of
tests/test_fira.py's module docstring across refreshes: the reference keeps Adam's moments, and a
flipped singular vector would flip a coordinate's gradient against its first moment). For
``projection="random"`` torch's generator and JAX's cannot agree, so the reference is handed
ng's random matrices (its projector's ``get_orthogonal_matrix`` returns them) and must then
produce the same trajectory; the matrices' own law (independent N(0, 1/r) entries) is checked
separately.

The authors multiply the update by ``sqrt(scale)``; ng's ``scale`` multiplies it directly, so
their ``scale=s`` is ng's ``scale=sqrt(s)`` (APOLLO-Mini: 128 and sqrt(128)).

Tolerances (on the displacement p_t - p_0): rtol 1e-4, atol 1e-6 for the matrices (float32
rounding; measured <= 0.7 of that); the 1-D leaf as in tests/test_fira.py (the library's plain
Adam adds ``eps`` after the bias correction: rtol 1e-3 at the authors' eps 1e-6).
"""

import importlib
import importlib.util
import math
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ngalore_jax as ng
from ngalore_jax import _apollo

LR, RANK, GAP, STEPS = 1e-2, 4, 5, 16  # refreshes at steps 0, 5, 10, 15
SHAPES = {"tall": (12, 5), "wide": (5, 11), "square": (6, 6), "tall_clipped": (9, 3),
          "bias": (7,)}
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def apollo_torch():
  """apollo_torch.apollo and its two projectors, loaded without the package ``__init__``.

  ``apollo_torch/__init__.py`` imports the 8-bit optimizers, which need bitsandbytes; an empty
  package module with the right ``__path__`` lets the submodules import on their own.
  """
  pytest.importorskip("torch", reason="torch is the reference here (dev extra)")
  if "apollo_torch" not in sys.modules:
    spec = importlib.util.find_spec("apollo_torch")
    if spec is None or not spec.submodule_search_locations:
      pytest.skip("apollo-torch is not installed")
    sys.modules["apollo_torch"] = importlib.util.module_from_spec(spec)
  try:
    return importlib.import_module("apollo_torch.apollo")
  except ImportError as e:  # apollo.py imports transformers.utils.versions
    pytest.skip(f"apollo-torch's APOLLOAdamW does not import here: {e}")


def make_problem(shapes, seed=0):
  rng = np.random.default_rng(seed)
  params = {k: (0.1 * rng.normal(size=s)).astype(np.float32) for k, s in shapes.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
           for _ in range(STEPS)]
  return params, grads


def apollo_state(state):
  is_apollo = lambda x: isinstance(x, ng.ApolloState)
  (found,) = [s for s in jax.tree.leaves(state, is_leaf=is_apollo) if is_apollo(s)]
  return found


def run_ng(tx, params0, grads):
  """Per step: the parameters after it, and the SVD projectors used at it (if stored)."""
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  trajectory, projectors = [], []
  for g in grads:
    updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append({k: np.asarray(v) for k, v in params.items()})
    projectors.append({k: np.asarray(f[0])
                       for k, f in apollo_state(state).projectors.items() if f})
  assert step._cache_size() == 1
  return trajectory, projectors


def run_reference(module, params0, grads, *, proj, scale_type, rank, authors_scale, eps,
                  basis_for=None, monkeypatch=None):
  """APOLLOAdamW ('std' projection on the matrices, its AdamW on the rest). ``basis_for(step,
  name, columns)`` replaces each refreshed projector's ``[d, r]`` columns (a sign gauge for
  'svd', ng's random matrix for 'random')."""
  import torch  # pylint: disable=import-outside-toplevel
  params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params0.items()}
  matrices = [k for k in params0 if params0[k].ndim == 2]
  groups = [{"params": [params[k] for k in matrices], "rank": rank, "update_proj_gap": GAP,
             "scale": authors_scale, "proj_type": "std", "proj": proj, "scale_type": scale_type},
            {"params": [params[k] for k in params0 if k not in matrices]}]
  optimizer = module.AdamW(groups, lr=LR, eps=eps)
  step, calls = [0], []
  if basis_for is not None:
    names = {params0[k].shape: k for k in matrices}
    if proj == "svd":
      projector = module.GaLoreProjector
    else:
      projector = module.GradientProjector
    original = projector.get_orthogonal_matrix

    def replaced(self, weights, rank, type, **kwargs):  # noqa: A002 (the authors' name)
      basis = original(self, weights, rank, type, **kwargs)
      columns = basis.T if type == "right" else basis  # right: [r, n]
      name = names[tuple(weights.shape)]
      calls.append((step[0], name))
      new = torch.tensor(basis_for(step[0], name, columns.numpy()))
      return new.T.contiguous() if type == "right" else new

    monkeypatch.setattr(projector, "get_orthogonal_matrix", replaced)
  trajectory = []
  for t, g in enumerate(grads):
    step[0] = t
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    optimizer.step()
    trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
  return trajectory, calls


def sign_gauge(ng_projectors, overlaps):
  def basis_for(step, name, columns):
    target = ng_projectors[step][name]
    overlap = np.sum(columns.astype(np.float64) * target, axis=0)
    overlaps.append((step, name, np.abs(overlap)))
    return (columns * np.where(overlap < 0, -1.0, 1.0)).astype(np.float32)
  return basis_for


def assert_close(got, want, params0, *, bias_rtol=RTOL):
  for t in range(len(want)):
    for k in params0:
      np.testing.assert_allclose(got[t][k] - params0[k], want[t][k] - params0[k],
                                 rtol=RTOL if params0[k].ndim == 2 else bias_rtol, atol=ATOL,
                                 err_msg=f"step {t}, leaf {k!r}")


def max_difference(a, b):
  return max(float(np.max(np.abs(a[-1][k] - b[-1][k]))) for k in a[-1])


@pytest.mark.parametrize("scale_type, authors_scale, eps, bias_rtol",
                         [("channel", 4.0, 1e-6, 1e-3), ("tensor", 128.0, 1e-8, RTOL)])
def test_svd_matches_apollo_across_refreshes(apollo_torch, monkeypatch, scale_type,
                                             authors_scale, eps, bias_rtol):
  params0, grads = make_problem(SHAPES)
  kwargs = dict(rank=RANK, update_proj_gap=GAP, projection="svd", scale_type=scale_type,
                scale=math.sqrt(authors_scale), eps=eps)
  got, ng_projectors = run_ng(ng.apollo(LR, **kwargs), params0, grads)
  overlaps = []
  want, calls = run_reference(apollo_torch, params0, grads, proj="svd", scale_type=scale_type,
                              rank=RANK, authors_scale=authors_scale, eps=eps,
                              basis_for=sign_gauge(ng_projectors, overlaps),
                              monkeypatch=monkeypatch)
  matrices = [k for k, s in SHAPES.items() if len(s) == 2]
  assert sorted(calls) == sorted((t, k) for t in range(0, STEPS, GAP) for k in matrices)
  for t, k, overlap in overlaps:  # the same singular vectors, up to sign
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4, err_msg=f"step {t}, leaf {k!r}")
  assert_close(got, want, params0, bias_rtol=bias_rtol)
  # The limiter acts in this run: without it the trajectory differs by far more than the
  # tolerance.
  unlimited, _ = run_ng(ng.apollo(LR, norm_growth_limit=None, **kwargs), params0, grads)
  assert max_difference(unlimited, got) > 1e3 * ATOL


@pytest.mark.parametrize("variant", ["apollo", "apollo_mini"])
def test_random_projection_matches_apollo_given_the_same_matrices(apollo_torch, monkeypatch,
                                                                  variant):
  """The reference is handed ng's random matrix of each leaf at each refresh: leaf i of the
  projected leaves in flattening order (here sorted names) at refresh t // GAP."""
  shapes = {k: s for k, s in SHAPES.items() if k != "tall_clipped"}  # ranks within the shapes
  projected = sorted(k for k, s in shapes.items() if len(s) == 2)
  params0, grads = make_problem(shapes, seed=1)
  if variant == "apollo":
    tx = ng.apollo(LR, rank=RANK, update_proj_gap=GAP, scale=2.0, seed=3)
    reference = dict(scale_type="channel", rank=RANK, authors_scale=4.0)
  else:
    tx = ng.apollo_mini(LR, update_proj_gap=GAP, seed=3)
    reference = dict(scale_type="tensor", rank=1, authors_scale=128.0)
  got, projectors = run_ng(tx, params0, grads)
  assert not any(projectors)  # nothing stored

  def ng_matrix(step, name, columns):
    matrix = _apollo.random_projection(columns.shape, seed=3, index=projected.index(name),
                                       refresh=step // GAP)
    return np.asarray(matrix)

  want, calls = run_reference(apollo_torch, params0, grads, proj="random", eps=1e-6,
                              basis_for=ng_matrix, monkeypatch=monkeypatch, **reference)
  assert sorted(calls) == sorted((t, k) for t in range(0, STEPS, GAP) for k in projected)
  assert_close(got, want, params0, bias_rtol=1e-3)


def test_random_projections_have_the_authors_law_and_change_at_each_refresh():
  """Entries N(0, 1/r) (the authors' randn / sqrt(r)); a new matrix per refresh and per leaf."""
  r = 16
  first = np.asarray(_apollo.random_projection((4096, r), seed=0, index=0, refresh=0))
  assert abs(first.mean()) < 4 / math.sqrt(first.size * r)  # ~4 standard errors
  np.testing.assert_allclose(first.var(), 1 / r, rtol=0.05)
  for other in (dict(index=1, refresh=0), dict(index=0, refresh=1)):
    matrix = np.asarray(_apollo.random_projection((4096, r), seed=0, **other))
    assert abs(np.corrcoef(first.ravel(), matrix.ravel())[0, 1]) < 0.05


def test_a_resumed_run_regenerates_the_same_random_projections():
  """The state holds no projector; a run resumed from a state saved as NumPy arrays (a
  checkpoint) continues exactly as the uninterrupted one, across a refresh."""
  params0, grads = make_problem({"w": (12, 5), "v": (4, 9)}, seed=2)
  tx = ng.apollo(LR, rank=2, update_proj_gap=3)
  step = jax.jit(tx.update)
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = tx.init(params)
  straight = []
  for t, g in enumerate(grads[:7]):
    updates, state = step(g, state, params)
    straight.append(updates)
    if t == 2:
      saved = jax.tree.map(np.asarray, state)
  resumed = jax.tree.map(jnp.asarray, saved)
  for t in range(3, 7):
    updates, resumed = step(grads[t], resumed, params)
    chex.assert_trees_all_close(updates, straight[t], rtol=0, atol=0)


def test_stacked_matrices_get_one_factor_and_one_limiter_each():
  """A [3, 12, 5] leaf equals three 12 x 5 leaves (SVD projection: no per-leaf randomness)."""
  rng = np.random.default_rng(4)
  grads = [rng.normal(size=(3, 12, 5)).astype(np.float32) for _ in range(7)]
  for scale_type in ng.APOLLO_SCALE_TYPES:
    tx = ng.scale_by_apollo(rank=2, update_proj_gap=3, projection="svd", scale_type=scale_type)
    stacked_state = tx.init({"w": jnp.zeros((3, 12, 5))})
    split_state = tx.init({f"w{i}": jnp.zeros((12, 5)) for i in range(3)})
    assert stacked_state.scaled_norm["w"].shape == (3,)
    step = jax.jit(tx.update)
    for g in grads:
      stacked, stacked_state = step({"w": jnp.asarray(g)}, stacked_state)
      split, split_state = step({f"w{i}": jnp.asarray(g[i]) for i in range(3)}, split_state)
      for i in range(3):
        np.testing.assert_allclose(stacked["w"][i], split[f"w{i}"], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build, rank, svd", [
    (lambda: ng.apollo(1e-3, rank=8), 8, False),
    (lambda: ng.apollo(1e-3, rank=8, projection="svd"), 8, True),
    (lambda: ng.apollo_mini(1e-3), 1, False),
])
def test_state_memory_per_matrix(build, rank, svd):
  """Moments 2 x r x max(m, n) per matrix (inner_state); the SVD basis r x min(m, n) only with
  projection="svd"; one limiter norm per matrix, counters and the 1-D leaf's Adam in "other"."""
  f32 = 4
  shapes = {"a": (64, 16), "b": (16, 48), "c": (32,)}
  params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
  got = ng.optimizer_state_bytes(jax.eval_shape(build().init, params))
  matrices = [s for s in shapes.values() if len(s) == 2]
  assert got["inner_state"] == sum(2 * rank * max(s) * f32 for s in matrices)
  assert got["projectors"] == (sum(rank * min(s) * f32 for s in matrices) if svd else 0)
  # APOLLO's count and 2 limiter norms; Adam's count and 2 x 32 moments for "c".
  assert got["other"] == (1 + 2) * f32 + (1 + 2 * 32) * f32


@pytest.mark.parametrize("projection", ng.APOLLO_PROJECTIONS)
def test_bfloat16_params_keep_their_dtype_with_one_compilation(projection):
  params = {"w": jnp.ones((12, 5), jnp.bfloat16), "b": jnp.zeros((5,), jnp.bfloat16)}
  tx = ng.apollo(LR, rank=2, update_proj_gap=2, projection=projection)
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
  tx = optax.inject_hyperparams(ng.apollo_mini, static_args=("update_proj_gap", "seed"))(
      learning_rate=LR, update_proj_gap=2)
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
  state_c = tx.init(params)  # B's first step again, with scale 1 instead of sqrt(128)
  state_c.hyperparams["learning_rate"] = jnp.asarray(2 * LR, jnp.float32)
  state_c.hyperparams["scale"] = jnp.asarray(1.0, jnp.float32)
  updates_c, _ = step(g, state_c, params)
  assert step._cache_size() == 1
  np.testing.assert_allclose(updates_c["w"], updates_b["w"] / math.sqrt(128), rtol=1e-5)
  np.testing.assert_allclose(updates_c["b"], updates_b["b"], rtol=1e-6)  # plain Adam


def test_inside_nnx_optimizer_matches_the_optax_loop():
  class Net(nnx.Module):

    def __init__(self, *, rngs):
      self.dense = nnx.Linear(6, 10, rngs=rngs)
      self.stack = nnx.Param(jax.random.normal(rngs.params(), (2, 10, 4)) * 0.3)

    def __call__(self, x):
      h = jnp.tanh(self.dense(x))
      return jnp.einsum("bi,kio->bko", h, self.stack[...])

  x = jnp.asarray(np.random.default_rng(5).normal(size=(8, 6)), jnp.float32)
  loss = lambda m: jnp.mean(m(x) ** 2)
  make_tx = lambda: ng.apollo(LR, rank=2, update_proj_gap=2, weight_decay=0.1)
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
  for _ in range(5):  # new random projections at 0, 2, 4
    nnx_losses.append(float(nnx_step(model, optimizer)))
    params, state, value = optax_step(params, state)
    optax_losses.append(float(value))
  np.testing.assert_allclose(nnx_losses, optax_losses, rtol=1e-5)
  assert nnx_losses[-1] < nnx_losses[0]
  assert ng.optimizer_state_bytes(optimizer.opt_state) == ng.optimizer_state_bytes(state)


def test_sharded_on_an_explicit_2x4_mesh_matches_one_device():
  """The default random projection (the SVD path places its state with galore_projection's
  code, tested in tests/test_sharding.py)."""
  # Moments split like the rows (tall), moved to the full-size columns (moved), split on the
  # rank (indivisible: 18 columns over 4 devices); both mesh axes on one weight (two_axes).
  specs = {"tall": ((32, 16), P("fsdp", None)), "moved": ((12, 40), P("fsdp", None)),
           "indivisible": ((8, 18), P("fsdp", None)), "two_axes": ((16, 48), P("data", "fsdp")),
           "bias": ((16,), P())}
  rng = np.random.default_rng(6)
  params = {k: rng.normal(size=s).astype(np.float32) for k, (s, _) in specs.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, (s, _) in specs.items()}
           for _ in range(3)]
  make_tx = lambda: ng.apollo(LR, rank=4, update_proj_gap=2, weight_decay=0.1)
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
  assert apollo_state(state).mu["tall"].sharding.spec == P("fsdp", None)  # 32 x r
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
    (lambda: ng.apollo(LR, rank=0), "rank"),
    (lambda: ng.apollo(LR, update_proj_gap=0), "update_proj_gap"),
    (lambda: ng.apollo(LR, scale_type="row"), "scale_type"),
    (lambda: ng.apollo(LR, projection="gaussian"), "projection"),
    (lambda: ng.apollo(LR, scale=-1.0), "scale"),
    (lambda: ng.apollo_mini(LR, scale=float("nan")), "scale"),
    (lambda: ng.scale_by_apollo(rank=2, scale=float("inf")), "scale"),
    (lambda: ng.apollo(LR, norm_growth_limit=0.99), "norm_growth_limit"),
    (lambda: ng.apollo(LR, b1=-0.1), "b1"),
    (lambda: ng.apollo(LR, proj_type="full"), "proj_type"),
    (lambda: ng.apollo(LR, seed=1.5), "seed"),
    (lambda: ng.scale_by_apollo(rank=2, dimension_numbers={"w": "tucker"}).init(
        {"w": jnp.zeros((3, 4, 5))}), "dimension_numbers"),
])
def test_bad_arguments_raise_value_error_naming_them(build, argument):
  with pytest.raises(ValueError, match=rf"\b{argument}\b"):
    build()
