"""Sharded init + update on 8 CPU devices (2 x 4 data/fsdp mesh), Explicit and Auto meshes."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ngalore_jax as ng

# name: (shape, parameter spec, expected spec of the low-rank coefficients / Adam moments)
LEAVES = {
    # tall -> right projection, coefficients 32 x r keep the sharded rows
    "tall": ((32, 16), P("fsdp", None), P("fsdp", None)),
    # wide -> left projection, coefficients r x 64 keep the sharded columns
    "wide": ((16, 64), P(None, "fsdp"), P(None, "fsdp")),
    # wide, sharded on the projected-away rows: the split moves to the full-size columns
    "moved": ((12, 40), P("fsdp", None), P(None, "fsdp")),
    # as above, but 18 columns do not divide over 4 devices: the rank (4) is split instead
    "indivisible": ((8, 18), P("fsdp", None), P("fsdp", None)),
    # an unsharded weight keeps unsharded state
    "replicated": ((6, 9), P(), P(None, None)),
    # both axes of the mesh on one weight: both move onto the coefficients' full-size dim
    "two_axes": ((16, 48), P("data", "fsdp"), P(None, ("fsdp", "data"))),
}
RANK = 4


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=shape).astype(np.float32) for k, (shape, _, _) in LEAVES.items()}
  params["bias"] = rng.normal(size=(16,)).astype(np.float32)
  return params


def gradients(step):
  return make_params(seed=100 + step)


def param_specs():
  specs = {k: spec for k, (_, spec, _) in LEAVES.items()}
  specs["bias"] = P()
  return specs


OPTIMIZERS = {
    # proj_type="std" pinned: check_low_rank_specs reasons about galore-torch's side.
    "galore": lambda: ng.galore(1e-2, rank=RANK, update_proj_gap=2, weight_decay=0.1,
                                proj_type="std"),
    "natural_galore": lambda: ng.natural_galore(1e-2, rank=RANK, update_proj_gap=2,
                                                history_size=3, refresh_policy="rotate",
                                                proj_type="std"),
}


@functools.cache
def single_device_reference(name):
  """3 steps of optimizer ``name`` on one device (no mesh), once for both mesh axis types.

  Jitted as one step (a fraction of the time of running it op by op).
  """
  tx = OPTIMIZERS[name]()

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params = jax.tree.map(jnp.asarray, make_params())
  state = jax.jit(tx.init)(params)
  for t in range(3):
    params, state = step(params, state, jax.tree.map(jnp.asarray, gradients(t)))
  return params


def galore_inner(state):
  return state[0].inner_states["galore"].inner_state


def check_low_rank_specs(state, history):
  inner = galore_inner(state)
  for name, (_, _, coefficient_spec) in LEAVES.items():
    adam = inner.inner_states[name][-1] if history else inner.inner_states[name]
    for moment in (adam.mu, adam.nu):
      assert moment.sharding.spec == coefficient_spec, (name, moment.sharding.spec)
    if history:
      woodbury = inner.inner_states[name][0]
      assert woodbury.history.sharding.spec == P(None, *coefficient_spec), name


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_matches_single_device(name, axis_type):
  assert jax.device_count() == 8, "tests/conftest.py forces 8 CPU devices"
  tx = OPTIMIZERS[name]()
  mesh = jax.make_mesh((2, 4), ("data", "fsdp"), axis_types=(axis_type,) * 2)
  param_shardings = {k: NamedSharding(mesh, s) for k, s in param_specs().items()}
  params = jax.device_put(make_params(), param_shardings)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          params, param_shardings)
  state_shardings = ng.state_shardings(tx, abstract)

  @jax.jit
  def step(params, state, grads):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  with jax.set_mesh(mesh):
    if axis_type == AxisType.Explicit:
      init, train_step = jax.jit(tx.init), step
    else:
      init = jax.jit(tx.init, out_shardings=state_shardings)
      train_step = jax.jit(step.__wrapped__, out_shardings=(param_shardings, state_shardings))
    state = init(params)
    check_low_rank_specs(state, history=name == "natural_galore")
    for t in range(3):
      grads = jax.device_put(gradients(t), param_shardings)
      params, state = train_step(params, state, grads)
    check_low_rank_specs(state, history=name == "natural_galore")
    # The state keeps the placement that state_shardings promised.
    jax.tree.map(lambda x, s: np.testing.assert_equal(x.sharding.spec, s.spec), state,
                 state_shardings)

  reference = single_device_reference(name)
  for k in reference:
    np.testing.assert_allclose(np.asarray(params[k]), np.asarray(reference[k]), rtol=1e-5,
                               atol=1e-6, err_msg=k)
