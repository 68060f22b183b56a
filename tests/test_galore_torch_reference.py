"""ng.galore against galore-torch's GaLoreAdamW (proj_type 'std' and 'full') and optax.contrib.galore.

Both references see the same fixed gradient sequence (not gradients of the evolving weights, so
the trajectories cannot drift apart for any other reason), over several projector refreshes, for
tall, wide and square matrices, matrices whose rank is clipped to their smaller side, and a 1-D
leaf (plain AdamW in galore-torch, plain Adam in ng.galore's default mask).

Singular vectors are only defined up to sign, and the sign a LAPACK path returns is arbitrary:
torch takes ``Vh`` of ``svd(G)`` for a right projection where ng takes ``U`` of ``svd(G^T)``, and
jax's CPU SVD of a wide matrix differs in sign from torch's. Within one projector interval the
signs cancel (``P`` appears twice, Adam is elementwise and sign-symmetric), so the first
``update_proj_gap`` steps must match as they are. With the "keep" refresh policy, though, Adam's
moments from the old basis meet coefficients in the new basis, and a flipped vector flips the sign
of that coordinate's gradient relative to its first moment: the trajectories differ from the first
refresh after step 0 on (by ~5e-3 per entry at lr 1e-2 in this set-up). That is a property of
GaLore, not of either implementation. To compare across refreshes, the reference's singular
vectors are flipped to ng's signs at each refresh (a gauge choice only: the test also asserts that
each of ng's projector vectors is, up to that sign, the reference's singular vector).
"""

import importlib
import importlib.util
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng

LR = 1e-2
RANK = 4
GAP = 5
STEPS = 16  # refreshes at steps 0, 5, 10, 15
SCALE = 0.5
TINY_EPS = 1e-12  # galore-torch adds eps to sqrt(v), optax to sqrt(v_hat): negligible at this size
SHAPES = {
    "tall": (12, 5),
    "wide": (5, 11),
    "square": (6, 6),
    "tall_clipped": (9, 3),  # rank 4 >= min dim: the whole 3-dim side is kept
    "wide_clipped": (3, 8),
    "bias": (7,),
}
MATRICES = [k for k, s in SHAPES.items() if len(s) == 2]
VECTORS = [k for k, s in SHAPES.items() if len(s) != 2]
# Float32 tolerances on the displacement p_t - p_0 (entries ~1e-2..1e-1): rounding in the SVD,
# projections and Adam is ~1e-6 relative.
RTOL, ATOL = 1e-4, 1e-6


@pytest.fixture(scope="module")
def galore_torch():
  """galore-torch's AdamW and GaLoreProjector, loaded without the package ``__init__``.

  ``galore_torch/__init__.py`` imports the 8-bit optimizer, which needs bitsandbytes; an empty
  package module with the right ``__path__`` lets the two submodules import on their own.
  (A later plain ``import galore_torch`` in the same process gets that empty module.)
  """
  torch = pytest.importorskip("torch", reason="torch is the reference here (dev extra)")
  if "galore_torch" not in sys.modules:
    spec = importlib.util.find_spec("galore_torch")
    if spec is None or not spec.submodule_search_locations:
      pytest.skip("galore-torch is not installed")
    # An empty package module (with __path__ and __spec__) whose __init__ is never executed.
    sys.modules["galore_torch"] = importlib.util.module_from_spec(spec)
  try:
    adamw = importlib.import_module("galore_torch.adamw")
    projector = importlib.import_module("galore_torch.galore_projector")
  except ImportError as e:  # adamw.py imports transformers.utils.versions
    pytest.skip(f"galore-torch's AdamW does not import here: {e}")
  return types.SimpleNamespace(
      torch=torch, AdamW=adamw.AdamW, GaLoreProjector=projector.GaLoreProjector,
      get_orthogonal_matrix=projector.GaLoreProjector.get_orthogonal_matrix)  # unpatched


def make_problem(seed=0, param_scale=0.1):
  rng = np.random.default_rng(seed)
  params = {k: (param_scale * rng.normal(size=s)).astype(np.float32) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
           for _ in range(STEPS)]
  return params, grads


def galore_factors(state):
  """{leaf name: tuple of projector factors} from the GaLoreProjectionState in ``state``."""
  is_projection = lambda x: isinstance(x, ng.GaLoreProjectionState)
  (projection,) = [s for s in jax.tree.leaves(state, is_leaf=is_projection) if is_projection(s)]
  return {k: tuple(np.asarray(x) for x in f) for k, f in projection.projectors.items() if f}


def galore_projectors(state):
  """{leaf name: projector} of one-sided projections (their single factor)."""
  return {k: f[0] for k, f in galore_factors(state).items()}


def run_ng(tx, params0, grads, record=galore_projectors):
  """Per step: the parameters after it, and the projector (``record`` of the state) used at it."""
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = tx.init(params)
  step = jax.jit(tx.update)
  trajectory, projectors = [], []
  for g in grads:
    updates, state = step({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    trajectory.append({k: np.asarray(v) for k, v in params.items()})
    projectors.append(record(state))
  return trajectory, projectors


class SignGauge:
  """Flips each reference singular vector to the sign of ng's projector at the same step.

  Records ``|<reference vector, ng vector>|`` for every vector it sees, so the caller can check
  that ng holds the same singular vectors (up to sign), and the steps at which it was called.
  """

  def __init__(self, ng_projectors):
    self.ng_projectors = ng_projectors
    self.step = 0
    self.overlaps = []
    self.calls = []

  def signs(self, name, vectors, factor=None):
    """``vectors``: ``[d, r]`` columns in float32 NumPy; returns the ``r`` signs to apply.

    ``factor``: which of ng's factors to align with, for a two-sided projection.
    """
    target = self.ng_projectors[self.step][name]
    target = target if factor is None else target[factor]
    assert target.shape == vectors.shape, (name, target.shape, vectors.shape)
    overlap = np.sum(vectors.astype(np.float64) * target, axis=0)
    self.overlaps.append((self.step, name, np.abs(overlap)))
    self.calls.append((self.step, name))
    return np.where(overlap < 0, -1.0, 1.0).astype(np.float32)


def run_galore_torch(gt, params0, grads, *, weight_decay, gauge=None, monkeypatch=None,
                     eps=TINY_EPS, proj_type="std"):
  """GaLoreAdamW: ``proj_type`` projection on the matrices, plain AdamW on the rest."""
  torch = gt.torch
  params = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params0.items()}
  groups = [
      {"params": [params[k] for k in MATRICES], "rank": RANK, "update_proj_gap": GAP,
       "scale": SCALE, "proj_type": proj_type},
      {"params": [params[k] for k in VECTORS]},
  ]
  optimizer = gt.AdamW(groups, lr=LR, betas=(0.9, 0.999), eps=eps, weight_decay=weight_decay,
                       correct_bias=True, no_deprecation_warning=True)
  if gauge is not None:
    names = {tuple(SHAPES[k]): k for k in MATRICES}

    def aligned(self, weights, rank, type):  # noqa: A002 (galore-torch's argument name)
      basis = gt.get_orthogonal_matrix(self, weights, rank, type)
      name = names[tuple(weights.shape)]
      if type == "full":  # [U[:, :r], Vh[:r]]: each flipped to the sign of ng's U and V
        u, vh = basis
        u_signs = torch.tensor(gauge.signs(name, u.numpy(), factor=0))
        v_signs = torch.tensor(gauge.signs(name, vh.T.numpy(), factor=1))
        return [u * u_signs[None, :], vh * v_signs[:, None]]
      columns = basis.T if type == "right" else basis  # right: Vh[:r] is [r, n]
      signs = torch.tensor(gauge.signs(name, columns.numpy()))
      return basis * signs[:, None] if type == "right" else basis * signs[None, :]

    monkeypatch.setattr(gt.GaLoreProjector, "get_orthogonal_matrix", aligned)
  trajectory = []
  for t, g in enumerate(grads):
    if gauge is not None:
      gauge.step = t
    for k, p in params.items():
      p.grad = torch.tensor(g[k])
    optimizer.step()
    trajectory.append({k: p.detach().numpy().copy() for k, p in params.items()})
  return trajectory


def assert_trajectories_close(got, want, params0, steps, rtol=RTOL, atol=ATOL):
  for t in steps:
    for k in SHAPES:
      np.testing.assert_allclose(got[t][k] - params0[k], want[t][k] - params0[k], rtol=rtol,
                                 atol=atol, err_msg=f"step {t}, leaf {k!r}")


def assert_same_singular_vectors(gauge, refresh_steps):
  """Every refresh was seen, at the right steps, and ng's vectors are the reference's."""
  assert sorted(set(gauge.calls)) == sorted((t, k) for t in refresh_steps for k in MATRICES)
  for step, name, overlap in gauge.overlaps:
    np.testing.assert_allclose(overlap, 1.0, atol=1e-4, err_msg=f"step {step}, leaf {name!r}")


def test_matches_galore_torch_within_the_first_projector_interval(galore_torch):
  """No sign alignment: before the first re-refresh the SVD's signs cancel."""
  params0, grads = make_problem()
  # galore-torch's side, pinned: ng.galore's default is reverse_std.
  tx = ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=TINY_EPS, proj_type="std",
                 refresh_policy="keep")
  got, _ = run_ng(tx, params0, grads[:GAP])
  want = run_galore_torch(galore_torch, params0, grads[:GAP], weight_decay=0.0)
  assert_trajectories_close(got, want, params0, range(GAP))


def test_matches_galore_torch_across_refreshes(galore_torch, monkeypatch):
  params0, grads = make_problem()
  # galore-torch keeps Adam's moments as they are when the projector changes.
  tx = ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=TINY_EPS, proj_type="std",
                 refresh_policy="keep")
  got, ng_projectors = run_ng(tx, params0, grads)
  gauge = SignGauge(ng_projectors)
  want = run_galore_torch(galore_torch, params0, grads, weight_decay=0.0, gauge=gauge,
                          monkeypatch=monkeypatch)
  assert_same_singular_vectors(gauge, refresh_steps=range(0, STEPS, GAP))
  # 'std' keeps the smaller side: projector [n, r] for tall/square, [m, r] for wide matrices.
  for k in MATRICES:
    m, n = SHAPES[k]
    assert ng_projectors[0][k].shape == ((n if m >= n else m), min(RANK, m, n))
  assert_trajectories_close(got, want, params0, range(STEPS))


def test_weight_decay_matches_galore_torch_up_to_its_decay_order(galore_torch, monkeypatch):
  """galore-torch decays the already-updated weights: p <- (1 - lr wd) (p - lr u).

  optax decays the weights before the step: q <- (1 - lr wd) q - lr u. With the same updates u
  (Adam's state does not depend on the weights), e = p - q obeys
  e <- (1 - lr wd) e + lr wd (lr u), so |e_N| <= N lr^2 wd max|u|: the stated tolerance. The
  exact e is computed from galore-torch's own increments lr u (its run without decay) and must
  account for the whole difference.
  """
  weight_decay = 0.5
  a = LR * weight_decay
  params0, grads = make_problem(param_scale=1.0)
  tx = ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=TINY_EPS, proj_type="std",
                 weight_decay=weight_decay, refresh_policy="keep")
  got, ng_projectors = run_ng(tx, params0, grads)
  want = run_galore_torch(galore_torch, params0, grads, weight_decay=weight_decay,
                          gauge=SignGauge(ng_projectors), monkeypatch=monkeypatch)
  undecayed = run_galore_torch(galore_torch, params0, grads, weight_decay=0.0,
                               gauge=SignGauge(ng_projectors), monkeypatch=monkeypatch)
  previous = [params0] + undecayed[:-1]
  increments = [{k: undecayed[t][k] - previous[t][k] for k in SHAPES} for t in range(STEPS)]
  e = {k: np.zeros(s, np.float64) for k, s in SHAPES.items()}
  bound = 0.0
  for t in range(STEPS):
    lr_u = {k: -increments[t][k].astype(np.float64) for k in SHAPES}
    e = {k: (1 - a) * e[k] + a * lr_u[k] for k in SHAPES}
    bound += a * max(np.max(np.abs(v)) for v in lr_u.values())
    for k in SHAPES:
      raw = want[t][k] - got[t][k]
      assert np.max(np.abs(raw)) <= bound + 1e-6, (t, k, np.max(np.abs(raw)), bound)
      np.testing.assert_allclose(got[t][k] - params0[k], (want[t][k] - e[k]) - params0[k],
                                 rtol=RTOL, atol=2 * ATOL, err_msg=f"step {t}, leaf {k!r}")
  # The decay itself is large and the correction is resolved: the test could see either missing.
  assert min(np.max(np.abs(want[-1][k] - undecayed[-1][k])) for k in SHAPES) > 1e-2
  assert max(np.max(np.abs(v)) for v in e.values()) > 100 * ATOL


def diagonal_gradient(shape, seed=0):
  """A gradient with distinct singular values on its diagonal and zeros elsewhere."""
  rng = np.random.default_rng(seed)
  k = min(shape)
  g = np.zeros(shape, np.float32)
  g[np.arange(k), np.arange(k)] = (np.arange(k, 0, -1) + 0.5 * rng.random(k)) * rng.choice(
      [-1.0, 1.0], k)
  return g


def test_full_matches_galore_torch_across_refreshes(galore_torch, monkeypatch):
  """proj_type="full": galore-torch's two-sided projection, ``U_r^T G V_r`` from one SVD.

  galore-torch stores ``[U[:, :r], Vh[:r]]`` (its "ortho matrix" is the pair), projects with
  ``U^T G Vh^T`` and back with ``U C Vh``, times ``scale``; ng stores ``U`` and ``V = Vh^T``.

  At a refresh, the coefficients of the very gradient that was decomposed are ``diag(s)`` in
  exact arithmetic: their off-diagonal entries are SVD rounding (~1e-7 relative), and Adam with
  empty moments (step 0) divides each by its own magnitude, so those entries of the first update
  are random signs, different in every implementation. Step 0's gradients are therefore
  diagonal matrices (whose SVD both libraries compute exactly); the refreshes at steps 5, 10 and
  15 are ordinary random gradients, where Adam's moments are no longer empty.
  """
  params0, grads = make_problem()
  for seed, k in enumerate(MATRICES):
    grads[0][k] = diagonal_gradient(SHAPES[k], seed)
  tx = ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, eps=TINY_EPS,
                 proj_type="full", refresh_policy="keep")
  got, ng_factors = run_ng(tx, params0, grads, record=galore_factors)
  gauge = SignGauge(ng_factors)
  want = run_galore_torch(galore_torch, params0, grads, weight_decay=0.0, gauge=gauge,
                          monkeypatch=monkeypatch, proj_type="full")
  assert_same_singular_vectors(gauge, refresh_steps=range(0, STEPS, GAP))
  state = jax.eval_shape(tx.init, {k: jnp.asarray(v) for k, v in params0.items()})
  adam = state[0].inner_states["galore"].inner_state.inner_states
  for k in MATRICES:
    m, n = SHAPES[k]
    r = min(RANK, m, n)
    assert [f.shape for f in ng_factors[0][k]] == [(m, r), (n, r)]
    assert adam[k].mu.shape == (r, r)
  assert_trajectories_close(got, want, params0, range(STEPS))


class _AlignedSvdNumpy:
  """Stands in for ``jax.numpy`` inside optax.contrib's GaLore; its SVD is sign-aligned to ng.

  The SVD runs inside ``lax.cond``, so the signs are computed with traced operations against
  the current step's ng projector (a constant).
  """

  def __init__(self, ng_projectors, names):
    self.ng_projectors = ng_projectors
    self.names = names
    self.step = 0
    self.linalg = types.SimpleNamespace(svd=self._svd)

  def __getattr__(self, name):
    return getattr(jnp, name)

  def _svd(self, a, full_matrices=True):
    u, s, vh = jnp.linalg.svd(a, full_matrices=full_matrices)
    m, n = a.shape
    target = jnp.asarray(self.ng_projectors[self.step][self.names[(m, n)]])
    r = target.shape[1]
    # optax.contrib: U[:, :r] when m >= n (the larger side), else Vh[:r].T.
    columns = u[:, :r] if m >= n else vh[:r].T
    signs = jnp.where(jnp.sum(columns * target, axis=0) < 0, -1.0, 1.0)
    signs = jnp.concatenate([signs, jnp.ones(s.shape[0] - r)]).astype(u.dtype)
    return u * signs[None, :], s, vh * signs[:, None]


def test_reverse_std_matches_optax_contrib_galore(monkeypatch):
  """optax.contrib.galore projects the larger side: ng's proj_type="reverse_std"."""
  weight_decay = 0.1
  params0, grads = make_problem()
  tx = ng.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE, proj_type="reverse_std",
                 weight_decay=weight_decay, refresh_policy="keep")  # optax keeps its moments
  got, ng_projectors = run_ng(tx, params0, grads)
  for k in MATRICES:
    m, n = SHAPES[k]
    assert ng_projectors[0][k].shape == ((m if m >= n else n), min(RANK, m, n))
  shim = _AlignedSvdNumpy(ng_projectors, {tuple(SHAPES[k]): k for k in MATRICES})
  monkeypatch.setattr(optax.contrib._galore, "jnp", shim)
  reference = optax.contrib.galore(LR, rank=RANK, update_proj_gap=GAP, scale=SCALE,
                                   weight_decay=weight_decay)
  params = {k: jnp.asarray(v) for k, v in params0.items()}
  state = reference.init(params)
  want = []
  for t, g in enumerate(grads):
    shim.step = t
    # Eager on purpose: each step's SVD is aligned to that step's ng projector.
    updates, state = reference.update({k: jnp.asarray(v) for k, v in g.items()}, state, params)
    params = optax.apply_updates(params, updates)
    want.append({k: np.asarray(v) for k, v in params.items()})
    (galore_state,) = [s for s in state if isinstance(s, optax.contrib.GaLoreState)]
    for k in MATRICES:  # the same singular vectors, refreshed at the same steps
      np.testing.assert_allclose(np.asarray(galore_state.projector[k]), ng_projectors[t][k],
                                 atol=1e-4, err_msg=f"step {t}, leaf {k!r}")
  assert_trajectories_close(got, want, params0, range(STEPS))
