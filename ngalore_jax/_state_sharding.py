"""Shardings of an optimizer state, derived from the parameters' shardings."""

from typing import Any

import jax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

import optax

from ngalore_jax import _tree


def state_shardings(tx: optax.GradientTransformation, abstract_params: Any) -> Any:
  """Returns a ``NamedSharding`` for every leaf of ``tx.init(params)``.

  The projection and Natural GaLore transforms place their own state when the parameters live
  on a mesh with ``Explicit`` axes: coefficients, Adam moments and gradient histories are split
  along their full-size dimension (over the mesh axes of both of the weight's dimensions when
  divisible), projectors along theirs, scalars replicated. This function obtains that placement
  for any mesh, ``Auto`` included, by tracing ``tx.init`` (no allocation) on an explicit copy of
  the parameters' mesh, so the result can be given to ``jax.jit`` as ``out_shardings`` of the
  initialisation and as ``in_shardings``/``out_shardings`` of the train step.

  Args:
    tx: The optimizer.
    abstract_params: The parameters as arrays or ``jax.ShapeDtypeStruct``, each with a
      ``NamedSharding`` (all on the same mesh). Each may be wrapped in a ``flax.nnx.Variable``,
      as in the ``nnx.State`` of ``nnx.state(nnx.eval_shape(make_model), nnx.Param)``;
      variables are unwrapped first.

  Returns:
    A pytree of ``NamedSharding`` on the parameters' mesh, shaped like
    ``tx.init`` of the unwrapped parameters: the optimizer state of a plain optax loop or of
    a Linen ``TrainState`` (``state.opt_state``), and ``nnx.as_pure(optimizer.opt_state)``
    for an ``nnx.Optimizer``.

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> from jax.sharding import NamedSharding, PartitionSpec as P
    >>> import ngalore_jax as ng
    >>> mesh = jax.make_mesh((1,), ("fsdp",))
    >>> params = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32,
    ...                                     sharding=NamedSharding(mesh, P("fsdp", None)))}
    >>> shardings = ng.state_shardings(ng.galore(1e-3, rank=2, proj_type="std"), params)
    >>> galore_state = shardings[0].inner_states["galore"].inner_state
    >>> galore_state.inner_states["w"].mu.spec  # coefficients 8 x r, split like the rows
    P('fsdp', None)
  """
  abstract_params = jax.tree.map(_tree.unwrap, abstract_params, is_leaf=_tree.is_array_wrapper)
  leaves = jax.tree.leaves(abstract_params)
  meshes = {leaf.sharding.mesh for leaf in leaves if isinstance(leaf.sharding, NamedSharding)}
  if len(meshes) != 1:
    raise ValueError("state_shardings: every parameter needs a NamedSharding on one common mesh; "
                     f"found {len(meshes)} meshes.")
  (mesh,) = meshes
  explicit_mesh = Mesh(mesh.devices, mesh.axis_names,
                       axis_types=(AxisType.Explicit,) * len(mesh.axis_names))

  def to_explicit(leaf):
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype,
                                sharding=NamedSharding(explicit_mesh, leaf.sharding.spec))

  with jax.set_mesh(explicit_mesh):
    abstract_state = jax.eval_shape(tx.init, jax.tree.map(to_explicit, abstract_params))
  # Values created without a sharding (scalar counters) come back with none: replicate them.
  spec_of = lambda s: s.sharding.spec if s.sharding is not None else PartitionSpec()
  return jax.tree.map(lambda s: NamedSharding(mesh, spec_of(s)), abstract_state)
