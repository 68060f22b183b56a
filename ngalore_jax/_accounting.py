"""Optimizer-state memory accounting, exact and allocation-free (works on ``jax.eval_shape``)."""

import math
from typing import Any

import jax
import numpy as np

from ngalore_jax._apollo import ApolloState
from ngalore_jax._kronecker import KroneckerState
from ngalore_jax._projection import GaLoreProjectionState
from ngalore_jax._woodbury import WoodburyState

CATEGORIES = ("projectors", "inner_state", "history", "curvature", "other")


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

  - ``projectors``: GaLore's orthonormal bases (:class:`GaLoreProjectionState.projectors`:
    both factors of a two-sided ``proj_type="full"`` projection, every factor of a Tucker one;
    and APOLLO's SVD bases).
  - ``inner_state``: the state of the transformation inside a projection (e.g. Adam's moments on
    the low-rank coefficients; with Fira, its limiter's scalar per matrix too), minus gradient
    histories; APOLLO's moments of the projected gradients.
  - ``history``: Natural GaLore's gradient histories (:class:`WoodburyState.history`, and the
    per-slot scales of an int8 history), wherever they are.
  - ``curvature``: Kronecker factors, their scales and cached roots
    (:class:`KroneckerState`), wherever they are.
  - ``other``: everything else (full-rank Adam moments of unprojected leaves, counters, the
    ``s x s`` Gram matrices and slot maxima Natural GaLore keeps beside its histories, ...).

  Args:
    state: An optimizer state, concrete or abstract (``jax.eval_shape(tx.init, params)``, so
      that a 7B model can be accounted for without allocating it): a plain optax state, a
      Linen ``TrainState``'s ``opt_state``, or an ``nnx.Optimizer``'s ``opt_state`` (its
      ``nnx.Variable`` entries count as the arrays they hold).

  Returns:
    A dict with one entry per category and ``"total"``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> params = {"w": jax.ShapeDtypeStruct((1024, 256), jnp.float32)}
    >>> state = jax.eval_shape(ng.galore(1e-3, rank=16).init, params)
    >>> ng.optimizer_state_bytes(state)["projectors"]  # 1024 x 16 float32 (the larger side)
    65536
  """
  totals = dict.fromkeys(CATEGORIES, 0)

  def is_special(x):
    return isinstance(x, (GaLoreProjectionState, WoodburyState, KroneckerState, ApolloState))

  def walk(node, category):
    for leaf in jax.tree.leaves(node, is_leaf=is_special):
      if isinstance(leaf, GaLoreProjectionState):
        walk(leaf.count, category)
        walk(leaf.projectors, "projectors")
        walk(leaf.inner_states, "inner_state")
      elif isinstance(leaf, ApolloState):
        walk((leaf.count, leaf.scaled_norm), category)
        walk(leaf.projectors, "projectors")
        walk((leaf.mu, leaf.nu), "inner_state")
      elif isinstance(leaf, WoodburyState):
        walk(leaf.count, category)
        walk(leaf.history, "history")
        walk(leaf.scales, "history")  # an int8 history's per-slot scales
        # The kept s x s Gram matrix and slot maxima: a few numbers per leaf whatever its size,
        # derived from the history (not part of its s x coefficients).
        walk((leaf.gram, leaf.maxima), "other")
      elif isinstance(leaf, KroneckerState):
        walk(leaf.count, category)
        walk((leaf.rows, leaf.cols, leaf.scale, leaf.inverse_root, leaf.root_scale),
             "curvature")
      elif hasattr(leaf, "shape"):
        totals[category] += math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize

  walk(state, "other")
  totals["total"] = sum(totals[c] for c in CATEGORIES)
  return totals
