"""optax's own battery for contributed optimizers, run on ``ng.galore`` and ``ng.natural_galore``.

The module is the pinned optax's ``optax/contrib/_common_test.py``, installed with optax. It is
executed unchanged but for three registrations, each made on the line it concerns (so its line
numbers, and the tracebacks, stay those of the installed file):

- its optimizer registries hold optax's ``galore`` (the peer) and ours, and none of its other
  optimizers (they are optax's to test, and would take many minutes here);
- its list of hyperparameters that ``inject_hyperparams`` cannot inject gets our shape-setting
  integers, as it holds optax's own (``rank``, ``update_proj_gap``, ...);
- its factory lookup resolves our names.

Its ``ContribTest`` (an absltest parameterized ``TestCase``) is re-exported here, so pytest
collects it. An optax upgrade that moves a registration point fails loudly at import.
"""

import importlib.util
import sys
import types

import ngalore_jax as ng

# Small ranks and histories that fit the battery's shapes (3-vectors, 2 x 2, 2 x 3, 2 x 5 x 2):
# rank 2 projects the 5-wide mode of the 2 x 5 x 2 leaf (Tucker) and keeps 2 x 2 matrices whole.
NG_OPTIMIZERS = (
    {"opt_name": "ng_galore", "opt_kwargs": {"learning_rate": 1e-2, "rank": 2}},
    {"opt_name": "ng_natural_galore",
     "opt_kwargs": {"learning_rate": 1e-2, "rank": 2, "history_size": 3}},
)
NG_FACTORIES = {"ng_galore": ng.galore, "ng_natural_galore": ng.natural_galore}
# Integers that set shapes or Python control flow: never traced.
NG_STATIC_ARGS = ["history_size", "oversampling", "power_iterations", "seed"]
# optax's optimizers kept beside ours.
KEPT_FROM_OPTAX = ("galore",)


def _registry(main, everything):
  """The battery's (main, all) optimizer lists: optax's galore and ours."""
  del everything  # every other entry wraps one of optax's optimizers in a contrib wrapper
  kept = tuple(o for o in main if o["opt_name"] in KEPT_FROM_OPTAX and o["wrapper_name"] is None)
  ours = tuple(dict(o, wrapper_name=None, wrapper_kwargs=None) for o in NG_OPTIMIZERS)
  return kept + ours, kept + ours


# (line of the installed file, the same line with our registration) pairs.
_REGISTRATIONS = (
    ("_MAIN_OPTIMIZERS_UNDER_TEST = tuple(_MAIN_OPTIMIZERS_UNDER_TEST)\n",
     "_MAIN_OPTIMIZERS_UNDER_TEST = tuple(_MAIN_OPTIMIZERS_UNDER_TEST); "
     "_MAIN_OPTIMIZERS_UNDER_TEST, _ALL_OPTIMIZERS_UNDER_TEST = _ng_registry("
     "_MAIN_OPTIMIZERS_UNDER_TEST, _ALL_OPTIMIZERS_UNDER_TEST)\n"),
    ("'ns_steps', 'rank', 'update_proj_gap']:\n",
     "'ns_steps', 'rank', 'update_proj_gap'] + _ng_static_args:\n"),
)


def _load_battery():
  spec = importlib.util.find_spec("optax.contrib._common_test")
  with open(spec.origin, encoding="utf-8") as f:
    source = f.read()
  for line, registered in _REGISTRATIONS:
    if source.count(line) != 1:
      raise RuntimeError(f"{spec.origin}: expected the line {line!r} once; the battery changed, "
                         "update the registrations in this file.")
    source = source.replace(line, registered)
  module = types.ModuleType("optax_contrib_battery_with_ngalore")
  module.__file__ = spec.origin
  module._ng_registry = _registry  # pylint: disable=protected-access
  module._ng_static_args = NG_STATIC_ARGS  # pylint: disable=protected-access
  sys.modules[module.__name__] = module
  exec(compile(source, spec.origin, "exec"), module.__dict__)  # pylint: disable=exec-used
  optax_factory = module._get_opt_factory  # pylint: disable=protected-access
  module._get_opt_factory = lambda name: NG_FACTORIES.get(name) or optax_factory(name)  # pylint: disable=protected-access
  return module


battery = _load_battery()
ContribTest = battery.ContribTest


def test_battery_runs_ours_beside_optax_galore():
  names = [o["opt_name"] for o in battery._ALL_OPTIMIZERS_UNDER_TEST]  # pylint: disable=protected-access
  assert names == ["galore", "ng_galore", "ng_natural_galore"]
