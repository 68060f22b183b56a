"""Every optimizer of the library inside Flax's training containers.

``nnx.Optimizer`` (flax NNX) and Linen's ``flax.training.train_state.TrainState`` must give the
same losses as the plain-pytree optax loop: ``jax.grad`` of a pure function, ``tx.update``,
``optax.apply_updates``. ``nnx.Optimizer`` converts the optimizer state through NNX's graph
machinery on every update, so these runs also check that the state's containers survive that
round trip (7 steps with a projector refresh every 3: steps 0, 3 and 6).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import ngalore_jax as ng

STEPS, GAP, RANK, LR = 7, 3, 2, 1e-2
IN, HIDDEN, GROUPS, MID, OUT = 6, 10, 3, 5, 4
BATCH = 16


def forward(params, x):
  """The model as a pure function of a dict of arrays: the reference for both Flax models."""
  h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
  h = jnp.tanh(jnp.einsum("bi,kio->bko", h, params["mix"])).reshape(x.shape[0], -1)
  return h @ params["out"]["kernel"] + params["out"]["bias"]


class Net(nnx.Module):
  """2-D kernels (6 x 10, 15 x 4), 1-D biases, and a 3-D kernel (3 x 10 x 5) for Tucker."""

  def __init__(self, *, rngs: nnx.Rngs):
    self.dense = nnx.Linear(IN, HIDDEN, bias_init=nnx.initializers.normal(0.1), rngs=rngs)
    self.mix = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (GROUPS, HIDDEN, MID)))
    self.out = nnx.Linear(GROUPS * MID, OUT, bias_init=nnx.initializers.normal(0.1), rngs=rngs)

  def __call__(self, x):
    h = jnp.tanh(self.dense(x))
    h = jnp.tanh(jnp.einsum("bi,kio->bko", h, self.mix[...])).reshape(x.shape[0], -1)
    return self.out(h)


class LinenNet(linen.Module):
  """The same network in Linen, with the same parameter names."""

  @linen.compact
  def __call__(self, x):
    h = jnp.tanh(linen.Dense(HIDDEN, name="dense")(x))
    mix = self.param("mix", linen.initializers.lecun_normal(), (GROUPS, HIDDEN, MID))
    h = jnp.tanh(jnp.einsum("bi,kio->bko", h, mix)).reshape(x.shape[0], -1)
    return linen.Dense(OUT, name="out")(h)


def stacked_axes(params):
  """Per leaf: the 3-D kernel as a stack of 10 x 5 matrices, the 2-D ones as matrices."""
  return jax.tree.map(
      lambda p: ng.MatrixAxes(1, 2) if p.ndim == 3 else ng.MatrixAxes() if p.ndim == 2 else None,
      params)


def projection(inner, **kwargs):
  return optax.chain(ng.galore_projection(inner, rank=RANK, update_proj_gap=GAP, **kwargs),
                     optax.scale_by_learning_rate(LR))


def woodbury_adam():
  return optax.chain(ng.woodbury_precondition(history_size=3), optax.scale_by_adam())


ALIAS = dict(rank=RANK, update_proj_gap=GAP)
# galore-torch's side pinned where the shapes asserted reason about it (the default: reverse_std).
STD = dict(ALIAS, proj_type="std")
NATURAL = dict(ALIAS, history_size=3)
OPTIMIZERS = {
    # galore_projection with three inners and the three refresh policies; Tucker on the 3-D leaf.
    "projection_adam_keep": lambda: projection(optax.scale_by_adam(), refresh_policy="keep"),
    "projection_natural_rotate_staggered": lambda: projection(
        woodbury_adam(), refresh_policy="rotate", stagger_refresh=True),
    "projection_momentum_reset_randomized": lambda: projection(
        optax.trace(0.9), refresh_policy="reset", svd_method="randomized", oversampling=1),
    "projection_kronecker_rotate": lambda: projection(
        optax.chain(ng.kronecker_precondition(), optax.scale_by_adam()), refresh_policy="rotate"),
    "woodbury_precondition": lambda: optax.chain(woodbury_adam(),
                                                 optax.scale_by_learning_rate(LR)),
    "galore": lambda: ng.galore(LR, **ALIAS),
    "galore_reset_stacked_matrix_axes": lambda: ng.galore(
        LR, refresh_policy="reset", dimension_numbers=stacked_axes,
        projector_dtype=jnp.bfloat16, weight_decay=0.1, **ALIAS),
    "natural_galore": lambda: ng.natural_galore(LR, **NATURAL),
    "natural_galore_keep_randomized_staggered": lambda: ng.natural_galore(
        LR, refresh_policy="keep", svd_method="randomized", oversampling=1,
        stagger_refresh=True, exponent=-0.5, damping_mode="relative", **NATURAL),
    # The authors' setting: two factors (U, V) per 2-D kernel, Tucker on the 3-D one.
    "natural_galore_official": lambda: ng.natural_galore(
        LR, **ALIAS, **ng.OFFICIAL_CODE_SETTINGS),
    "fira": lambda: ng.fira(LR, **ALIAS),
    "apollo": lambda: ng.apollo(LR, **ALIAS),
    "apollo_mini": lambda: ng.apollo_mini(LR, update_proj_gap=GAP),
}
NAMES = list(OPTIMIZERS)


def batches():
  """One fixed regression batch, fed at every step (so the loss must go down)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(BATCH, IN)), jnp.float32)
  y = jnp.asarray(rng.normal(size=(BATCH, OUT)), jnp.float32)
  return [(x, y)] * (STEPS + 1)


def mse(prediction, y):
  return jnp.mean((prediction - y) ** 2)


def initial_params():
  return nnx.to_pure_dict(nnx.state(Net(rngs=nnx.Rngs(0)), nnx.Param))


@functools.cache
def reference(name):
  """The plain optax loop on a dict of arrays: losses before each step and after the last."""
  tx = OPTIMIZERS[name]()
  params = initial_params()
  state = tx.init(params)

  @jax.jit
  def step(params, state, x, y):
    loss, grads = jax.value_and_grad(lambda p: mse(forward(p, x), y))(params)
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  losses = []
  data = batches()
  for x, y in data[:STEPS]:
    params, state, loss = step(params, state, x, y)
    losses.append(float(loss))
  losses.append(float(mse(forward(params, data[STEPS][0]), data[STEPS][1])))
  return np.array(losses), state


def test_the_flax_models_compute_the_reference_function():
  x, _ = batches()[0]
  model = Net(rngs=nnx.Rngs(0))
  params = initial_params()
  want = forward(params, x)
  np.testing.assert_allclose(model(x), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(LinenNet().apply({"params": params}, x), want, rtol=1e-6,
                             atol=1e-6)


def nnx_train(tx):
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(lambda m: mse(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  structure = jax.tree.structure(nnx.as_pure(optimizer.opt_state))
  losses = []
  data = batches()
  for x, y in data[:STEPS]:
    losses.append(float(step(model, optimizer, x, y)))
    assert jax.tree.structure(nnx.as_pure(optimizer.opt_state)) == structure
  losses.append(float(mse(model(data[STEPS][0]), data[STEPS][1])))
  return np.array(losses), optimizer


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_matches_the_optax_loop(name):
  want, reference_state = reference(name)
  losses, optimizer = nnx_train(OPTIMIZERS[name]())
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=1e-7)
  assert losses[-1] < losses[0]
  assert ng.optimizer_state_bytes(optimizer.opt_state) == ng.optimizer_state_bytes(
      reference_state)


@pytest.mark.parametrize("name", NAMES)
def test_linen_train_state_matches_the_optax_loop(name):
  want, reference_state = reference(name)
  state = train_state.TrainState.create(
      apply_fn=LinenNet().apply, params={"params": initial_params()}, tx=OPTIMIZERS[name]())

  @jax.jit
  def step(state, x, y):
    loss_fn = lambda params: mse(state.apply_fn(params, x), y)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss

  losses = []
  data = batches()
  for x, y in data[:STEPS]:
    state, loss = step(state, x, y)
    losses.append(float(loss))
  losses.append(float(mse(state.apply_fn(state.params, data[STEPS][0]), data[STEPS][1])))
  np.testing.assert_allclose(losses, want, rtol=2e-5, atol=1e-7)
  assert ng.optimizer_state_bytes(state.opt_state) == ng.optimizer_state_bytes(reference_state)


def test_state_bytes_of_an_nnx_optimizer_count_each_projector():
  # Projectors at rank 2 (float32): dense 6 x 10 ('std' keeps the 6-side: 6 x 2), out 15 x 4
  # (the 4-side: 4 x 2), Tucker on mix 3 x 10 x 5 (3 x 2, 10 x 2, 5 x 2).
  optimizer = nnx.Optimizer(Net(rngs=nnx.Rngs(0)), ng.galore(LR, **STD), wrt=nnx.Param)
  counts = ng.optimizer_state_bytes(optimizer.opt_state)
  assert counts["projectors"] == 4 * (6 * 2 + 4 * 2 + 3 * 2 + 10 * 2 + 5 * 2)
  # Adam's two moments on the coefficients (2 x 10, 15 x 2 and the 2 x 2 x 2 core), and its
  # int32 step count, once per projected leaf.
  assert counts["inner_state"] == 4 * 2 * (2 * 10 + 15 * 2 + 2 * 2 * 2) + 3 * 4
  assert counts["history"] == 0


def test_unprojected_leaves_keep_an_empty_projector_tuple_in_nnx():
  _, optimizer = nnx_train(OPTIMIZERS["projection_adam_keep"]())
  galore_state = optimizer.opt_state[0]
  assert nnx.as_pure(galore_state.projectors["dense"]["bias"]) == ()
  factors = nnx.as_pure(galore_state.projectors["mix"])
  assert isinstance(factors, tuple) and [f.shape for f in factors] == [(3, 2), (10, 2), (5, 2)]
  assert isinstance(nnx.as_pure(galore_state.inner_states["mix"]), optax.ScaleByAdamState)


def test_state_shardings_accept_an_nnx_state_of_abstract_params():
  mesh = jax.make_mesh((2,), ("fsdp",), devices=jax.devices()[:2])
  abstract = nnx.state(nnx.eval_shape(lambda: Net(rngs=nnx.Rngs(0))), nnx.Param)

  def place(x):
    spec = P("fsdp") if x.shape[0] % 2 == 0 else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, spec))

  abstract = jax.tree.map(place, abstract)
  assert isinstance(abstract["dense"]["kernel"], nnx.Param)
  tx = ng.galore(LR, **STD)
  shardings = ng.state_shardings(tx, abstract)
  model = Net(rngs=nnx.Rngs(0))
  optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
  # Shaped like the state's arrays: nnx.as_pure(optimizer.opt_state).
  assert jax.tree.structure(shardings) == jax.tree.structure(nnx.as_pure(optimizer.opt_state))
  # Usable as jit shardings.
  params = nnx.as_pure(nnx.state(model, nnx.Param))
  state = jax.jit(tx.init, out_shardings=shardings)(params)
  galore = state[0].inner_states["galore"].inner_state
  # dense 6 x 10 rows split over fsdp; 'std' keeps the 6-side, coefficients 2 x 10 are split
  # along their full-size dimension (10 divides by 2).
  assert galore.inner_states["dense"]["kernel"].mu.sharding.spec == P(None, "fsdp")
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert leaf.sharding == sharding


def test_llama_galore_mask_selects_the_same_kernels_for_nnx_and_dicts():
  from models import llama  # pylint: disable=import-outside-toplevel

  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                          num_heads=4, num_kv_heads=2)
  model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  variables = nnx.state(model, nnx.Param)
  from_nnx = llama.galore_mask(variables)
  from_dict = llama.galore_mask(nnx.to_pure_dict(variables))
  want = {f"blocks/{i}/{part}/{name}/kernel" for i in range(2)
          for part, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down")))
          for name in names}
  for mask in (from_nnx, from_dict):
    got = {"/".join(str(getattr(k, "key", k)) for k in path)
           for path, leaf in jax.tree_util.tree_leaves_with_path(mask) if leaf}
    assert got == want
  optimizer = nnx.Optimizer(
      model, ng.natural_galore(LR, rank=4, history_size=2, mask=llama.galore_mask,
                               proj_type="std"),
      wrt=nnx.Param)
  tokens = jnp.arange(16, dtype=jnp.int32).reshape(2, 8) % cfg.vocab_size

  @nnx.jit
  def step(model, optimizer):
    loss_fn = lambda m: optax.softmax_cross_entropy_with_integer_labels(
        m(tokens[:, :-1]), tokens[:, 1:]).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss

  losses = [float(step(model, optimizer)) for _ in range(3)]
  assert losses[-1] < losses[0]
  counts = ng.optimizer_state_bytes(optimizer.opt_state)
  # Every projected kernel has a projector: 14 kernels, rank 4, their smaller side.
  smaller = {"q": 32, "k": 16, "v": 16, "o": 32, "gate": 32, "up": 32, "down": 32}
  assert counts["projectors"] == 4 * 4 * 2 * sum(smaller.values())
