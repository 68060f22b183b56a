"""Bad hyperparameters fail at construction with a ``ValueError`` that names the argument.

One case per bad value. Values that cannot be judged in Python (traced arrays under
``optax.inject_hyperparams`` or ``jax.jit``) are let through.
"""

import re

import jax
import jax.numpy as jnp
import optax
import pytest

import ngalore_jax as ng
from ngalore_jax import _checks

NAN, INF = float("nan"), float("inf")


def projection(**kwargs):
  return ng.galore_projection(optax.scale_by_adam(), rank=2, **kwargs)


def assert_names(argument, build):
  with pytest.raises(ValueError, match=rf"`{re.escape(argument)}`"):
    build()


@pytest.mark.parametrize("value", [0.0, -0.25, -1, NAN, INF, -INF])
@pytest.mark.parametrize("factory", [
    projection,
    lambda **kw: ng.galore(1e-3, **kw),
    lambda **kw: ng.natural_galore(1e-3, **kw),
], ids=["galore_projection", "galore", "natural_galore"])
def test_scale_must_be_finite_and_positive(factory, value):
  assert_names("scale", lambda: factory(scale=value))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.uint8, jnp.bool_, "int16",
                                   "not-a-dtype"])
@pytest.mark.parametrize("factory", [
    projection,
    lambda **kw: ng.galore(1e-3, **kw),
    lambda **kw: ng.natural_galore(1e-3, **kw),
], ids=["galore_projection", "galore", "natural_galore"])
def test_projector_dtype_must_be_floating_point(factory, dtype):
  assert_names("projector_dtype", lambda: factory(projector_dtype=dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, "float32", None])
def test_floating_projector_dtypes_are_accepted(dtype):
  tx = projection(projector_dtype=dtype)
  state = tx.init({"w": jnp.zeros((6, 4))})
  want = jnp.float32 if dtype is None else jnp.dtype(dtype)
  assert state.projectors["w"][0].dtype == want


@pytest.mark.parametrize("value", [NAN, INF, -1.5, 0.0])
def test_exponent_outside_its_range_or_not_finite(value):
  assert_names("exponent", lambda: ng.woodbury_precondition(exponent=value))


@pytest.mark.parametrize("value", [INF, NAN, 0.0, -1e-3])
def test_damping_must_be_finite_and_positive(value):
  assert_names("damping", lambda: ng.woodbury_precondition(damping=value))


@pytest.mark.parametrize("value", [NAN, INF])
def test_natural_galore_forwards_non_finite_damping_and_exponent(value):
  assert_names("damping", lambda: ng.natural_galore(1e-3, damping=value))
  assert_names("exponent", lambda: ng.natural_galore(1e-3, exponent=value))


# The checks themselves, as the other transformations call them.


@pytest.mark.parametrize("value", [NAN, INF, -INF, 0, -2, 0.0])
def test_check_positive_rejects(value):
  assert_names("damping", lambda: _checks.check_positive("damping", value))


@pytest.mark.parametrize("value", [1e-30, 3, 1e30, jnp.float32(0.5), jnp.asarray(2.0)])
def test_check_positive_accepts(value):
  _checks.check_positive("damping", value)


@pytest.mark.parametrize("value", [NAN, INF, -INF, -1.0000001, 0.0, 0.5])
def test_check_range_rejects(value):
  assert_names("exponent", lambda: _checks.check_range("exponent", value, -1.0, 0.0,
                                                       high_open=True))


def test_check_range_rejects_infinity_even_with_infinite_bounds():
  assert_names("beta", lambda: _checks.check_range("beta", INF, 0.0, INF))


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.int8, jnp.bool_, "uint8", "int64",
                                   jnp.complex64, "nonsense"])
def test_check_float_dtype_rejects(dtype):
  assert_names("history_dtype", lambda: _checks.check_float_dtype("history_dtype", dtype))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16, "float64"])
def test_check_float_dtype_accepts(dtype):
  _checks.check_float_dtype("history_dtype", dtype)


def test_traced_values_are_not_judged():
  @jax.jit
  def check(value):
    _checks.check_positive("damping", value)
    _checks.check_range("exponent", value, -1.0, 0.0)
    return value

  assert float(check(jnp.float32(-5.0))) == -5.0  # no error: a tracer cannot be compared


def test_injected_scale_is_accepted():
  static = ("rank", "update_proj_gap", "oversampling", "power_iterations", "seed")
  tx = optax.inject_hyperparams(ng.galore, static_args=static)(1e-3, rank=2, scale=0.5)
  params = {"w": jnp.ones((6, 4))}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.eye(6, 4)}, state, params)
  assert float(state.hyperparams["scale"]) == 0.5
  assert updates["w"].shape == (6, 4)
