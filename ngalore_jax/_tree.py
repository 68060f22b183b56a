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
