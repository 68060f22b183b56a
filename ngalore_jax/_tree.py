"""Small pytree utilities."""

from typing import Any, Callable

import jax


def map_unzip(fn: Callable[..., tuple], tree: Any, *rest: Any, num_outputs: int = 2) -> tuple:
  """Maps ``fn`` over the leaves of ``tree`` and returns one tree per output of ``fn``.

  Each tree in ``rest`` must have ``tree``'s structure as a prefix; ``fn`` receives the matching
  subtree. Unlike ``jax.tree.map`` followed by a transpose, this never mistakes a tuple container
  in the user's pytree for a tuple of outputs.
  """
  leaves, treedef = jax.tree.flatten(tree)
  rest_leaves = [treedef.flatten_up_to(r) for r in rest]
  outputs = [fn(*args) for args in zip(leaves, *rest_leaves)]
  columns = list(zip(*outputs)) if outputs else [()] * num_outputs
  return tuple(jax.tree.unflatten(treedef, list(col)) for col in columns)


def is_array_wrapper(x: Any) -> bool:
  """True for an array, or a pytree node that wraps exactly one array and exposes its shape.

  ``flax.nnx.Variable`` (e.g. the ``nnx.Param`` entries of ``nnx.state(model)``, which
  ``nnx.Optimizer`` hands to ``init``) is such a wrapper; plain arrays and
  ``jax.ShapeDtypeStruct`` count too.
  """
  if not (hasattr(x, "shape") and hasattr(x, "dtype")):
    return False
  return len(jax.tree.leaves(x)) == 1


def unwrap(x: Any) -> Any:
  """The array inside an :func:`is_array_wrapper` node (the array itself for a plain array)."""
  return jax.tree.leaves(x)[0]


def rewrap(like: Any, value: Any) -> Any:
  """Puts ``value`` in a wrapper like ``like`` (``value`` itself when ``like`` is an array)."""
  return jax.tree.structure(like).unflatten([value])


def flatten_arrays(tree: Any) -> tuple[list, Any]:
  """``jax.tree.flatten`` that stops at array wrappers: returns (wrappers, treedef).

  A per-leaf structure built with this treedef takes the wrapper's place instead of being put
  inside it, so a state container (a tuple of factors, an inner optimizer's ``NamedTuple``)
  never ends up as the value of an ``nnx.Variable``. ``nnx.Optimizer`` would convert the
  parameter's ``Variable`` into an ``OptVariable`` holding the container, and updating it in
  place would turn the container into an integer-keyed ``nnx.State``.
  """
  return jax.tree.flatten(tree, is_leaf=is_array_wrapper)
