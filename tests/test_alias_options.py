"""The aliases forward every projection option, declared once, to ``galore_projection``."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng
from ngalore_jax import _alias

LR = 1e-2
BASE = dict(rank=2, update_proj_gap=2)
# A value other than the default for every projection option. The randomized-SVD options are
# tried with svd_method="randomized", where they matter.
RANDOMIZED = dict(svd_method="randomized", oversampling=1)
OPTIONS = {
    "rank": (dict(rank=1), {}),
    "update_proj_gap": (dict(update_proj_gap=1), {}),
    "scale": (dict(scale=0.5), {}),
    "proj_type": (dict(proj_type="std"), {}),
    "refresh_policy": (dict(refresh_policy="rotate"), {}),
    "svd_method": (dict(svd_method="randomized"), dict(oversampling=1)),
    "oversampling": (dict(oversampling=2), RANDOMIZED),
    "power_iterations": (dict(power_iterations=0), RANDOMIZED),
    "stagger_refresh": (dict(stagger_refresh=True), {}),
    "dimension_numbers": (dict(dimension_numbers=ng.MatrixAxes(1, 0)), {}),
    "projector_dtype": (dict(projector_dtype=jnp.bfloat16), {}),
    "seed": (dict(seed=7), RANDOMIZED),
}


# Keywords of galore_projection that are hooks for transformations built on it, not options.
HOOKS = {"combine"}


def test_projection_options_are_the_projection_keywords():
  signature = inspect.signature(ng.galore_projection)
  keywords = {n for n, p in signature.parameters.items() if p.kind is p.KEYWORD_ONLY} - HOOKS
  assert set(_alias.PROJECTION_OPTIONS) == keywords  # a new option must be forwarded
  assert len(_alias.PROJECTION_OPTIONS) == len(keywords)  # and declared once
  assert set(OPTIONS) == keywords


@pytest.mark.parametrize("alias", [ng.galore, ng.natural_galore])
def test_aliases_declare_each_option_with_the_projection_default(alias):
  projection = inspect.signature(ng.galore_projection).parameters
  parameters = inspect.signature(alias).parameters
  for name in _alias.PROJECTION_OPTIONS:
    assert parameters[name].kind is inspect.Parameter.KEYWORD_ONLY, name
    if name == "rank":  # required by the projection; the aliases default to 128
      continue
    # The aliases project the larger side by default (measured); galore_projection keeps
    # galore-torch's "std".
    want = ("reverse_std" if name == "proj_type" else projection[name].default)
    assert parameters[name].default == want, name


def params_and_grads():
  keys = jax.random.split(jax.random.key(0), 3)
  shapes = {"w": (8, 6), "t": (3, 5, 4), "b": (6,)}
  params = {k: jax.random.normal(key, s) for key, (k, s) in zip(keys, shapes.items())}
  grads = [jax.tree.map(lambda p, i=i: jnp.sin(p * (i + 1)) + 0.1 * i, params)
           for i in range(3)]
  return params, grads


@functools.cache
def run_galore(**settings):
  return run(ng.galore(LR, **settings))


def run(tx):
  params, grads = params_and_grads()
  state = tx.init(params)
  update = jax.jit(tx.update)
  out = []
  for g in grads:
    updates, state = update(g, state, params)
    params = optax.apply_updates(params, updates)
    out.append(updates)
  return out


def by_hand(**projection_options):
  """ng.galore's documented composition, written with optax's building blocks."""
  labels = lambda params: jax.tree.map(lambda p: "galore" if p.ndim >= 2 else "adam", params)
  return optax.chain(
      optax.partition({"galore": ng.galore_projection(
          optax.scale_by_adam(), **{"proj_type": "reverse_std", **projection_options}),
                       "adam": optax.scale_by_adam()}, labels),
      optax.add_decayed_weights(0.0),
      optax.scale_by_learning_rate(LR))


@pytest.mark.parametrize("name", list(OPTIONS))
def test_galore_forwards_each_option(name):
  option, context = OPTIONS[name]
  settings = {**BASE, **context, **option}
  got = run(ng.galore(LR, **settings))
  want = run(by_hand(**settings))
  without = run_galore(**BASE, **context)
  for got_step, want_step in zip(got, want):
    for key in got_step:
      np.testing.assert_allclose(got_step[key], want_step[key], rtol=2e-4, atol=1e-7,
                                 err_msg=f"{name}: {key}")
  # The option changed something, so the comparison above could fail had it been dropped.
  assert any(not np.allclose(a[k], b[k], rtol=1e-3, atol=1e-6)
             for a, b in zip(got, without) for k in a)


def test_natural_galore_forwards_the_options_too():
  settings = dict(BASE, proj_type="left", scale=0.5, refresh_policy="reset")
  params, _ = params_and_grads()
  want_state = jax.eval_shape(
      ng.galore_projection(optax.scale_by_adam(), **settings).init, params)
  state = ng.natural_galore(LR, history_size=2, **settings).init(params)
  projection_state = state[0].inner_states["galore"].inner_state
  for key in ("w",):  # 'left': projectors are m x r
    assert projection_state.projectors[key][0].shape == want_state.projectors[key][0].shape
    assert projection_state.projectors[key][0].shape == (params[key].shape[0], 2)
  natural = run(ng.natural_galore(LR, history_size=2, **settings))
  default = run(ng.natural_galore(LR, history_size=2, **BASE))
  assert not np.allclose(natural[-1]["w"], default[-1]["w"])
