"""Optimizer-state memory accounting, exact and allocation-free (works on ``jax.eval_shape``)."""

import math
from typing import Any

import jax
import numpy as np

from ngalore_jax._projection import GaLoreProjectionState
from ngalore_jax._woodbury import WoodburyState

CATEGORIES = ("projectors", "inner_state", "history", "other")


def tree_bytes(tree: Any) -> int:
  """Total bytes of the arrays (or ``jax.ShapeDtypeStruct``) in ``tree``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> ng.tree_bytes({"w": jnp.zeros((4, 8)), "b": jnp.zeros((8,), jnp.bfloat16)})
    144
  """
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree) if hasattr(x, "shape"))


def optimizer_state_bytes(state: Any) -> dict[str, int]:
  """Bytes of an optimizer state, broken down by what they hold.

  Categories:

  - ``projectors``: GaLore's orthonormal bases (:class:`GaLoreProjectionState.projectors`).
  - ``inner_state``: the state of the transformation inside a projection (e.g. Adam's moments on
    the low-rank coefficients), minus gradient histories.
  - ``history``: Natural GaLore's gradient histories (:class:`WoodburyState.history`), wherever
    they are.
  - ``other``: everything else (full-rank Adam moments of unprojected leaves, counters, ...).

  Args:
    state: An optimizer state, concrete or abstract (``jax.eval_shape(tx.init, params)``, so
      that a 7B model can be accounted for without allocating it).

  Returns:
    A dict with one entry per category and ``"total"``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32)}
    >>> state = jax.eval_shape(ng.galore(1e-3, rank=16).init, params)
    >>> ng.optimizer_state_bytes(state)["projectors"]  # 256 x 16 float32
    16384
  """
  totals = dict.fromkeys(CATEGORIES, 0)

  def is_special(x):
    return isinstance(x, (GaLoreProjectionState, WoodburyState))

  def walk(node, category):
    for leaf in jax.tree.leaves(node, is_leaf=is_special):
      if isinstance(leaf, GaLoreProjectionState):
        walk(leaf.count, category)
        walk(leaf.projectors, "projectors")
        walk(leaf.inner_states, "inner_state")
      elif isinstance(leaf, WoodburyState):
        walk(leaf.count, category)
        walk(leaf.history, "history")
      elif hasattr(leaf, "shape"):
        totals[category] += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

  walk(state, "other")
  totals["total"] = sum(totals[c] for c in CATEGORIES)
  return totals
