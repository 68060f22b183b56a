"""Sharding helpers for explicit-sharding meshes (sharding in types).

Under an ``Explicit`` mesh every array carries its sharding in its type, and a few operations
refuse ambiguous or sharded input: ``svd``/``qr`` need the matrix dims unsharded, and a
contraction over a sharded dimension needs its output sharding stated. Under ``Auto`` meshes (or
no mesh) these helpers do nothing and leave placement to XLA's propagation.
"""

import math
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec


def explicit_sharding(x: jax.Array) -> Optional[NamedSharding]:
  """Returns ``x``'s sharding if it lives on a mesh with explicit axes, else ``None``."""
  try:
    sharding = jax.typeof(x).sharding
  except (AttributeError, TypeError):
    return None
  if not isinstance(sharding, NamedSharding):
    return None
  if not any(t == AxisType.Explicit for t in sharding.mesh.axis_types):
    return None
  return sharding


def spec_axes(spec: PartitionSpec, ndim: int) -> list[tuple[str, ...]]:
  """The mesh axes of each of ``ndim`` dimensions, as tuples (empty = unsharded)."""
  entries = list(spec) + [None] * (ndim - len(spec))
  out = []
  for entry in entries[:ndim]:
    if entry is None:
      out.append(())
    elif isinstance(entry, str):
      out.append((entry,))
    else:
      out.append(tuple(entry))
  return out


def axes_size(mesh, axes: Sequence[str]) -> int:
  return math.prod(mesh.shape[a] for a in axes)


def to_spec(axes_per_dim: Sequence[tuple[str, ...]]) -> PartitionSpec:
  entries = []
  for axes in axes_per_dim:
    entries.append(None if not axes else (axes[0] if len(axes) == 1 else tuple(axes)))
  return PartitionSpec(*entries)


def reshard(x: jax.Array, mesh, axes_per_dim: Sequence[tuple[str, ...]]) -> jax.Array:
  """Reshards ``x`` (explicit mesh) so that dimension i is split over ``axes_per_dim[i]``."""
  return jax.sharding.reshard(x, NamedSharding(mesh, to_spec(axes_per_dim)))


def replicate_matrix_dims(x: jax.Array, num_matrix_dims: int = 2) -> jax.Array:
  """Gathers the trailing matrix dims of ``x`` (explicit meshes only), e.g. before an SVD."""
  sharding = explicit_sharding(x)
  if sharding is None:
    return x
  axes = spec_axes(sharding.spec, x.ndim)
  if not any(axes[-num_matrix_dims:]):
    return x
  axes = axes[:-num_matrix_dims] + [()] * num_matrix_dims
  return reshard(x, sharding.mesh, axes)


def einsum(subscripts: str, *operands: jax.Array,
           out_axes: Sequence[tuple[str, ...]]) -> jax.Array:
  """``jnp.einsum`` that states its output sharding when an operand is explicitly sharded.

  ``out_axes`` gives the mesh axes of each output dimension; it is ignored (and XLA decides)
  unless an operand lives on an explicit mesh.
  """
  shardings = [s for s in map(explicit_sharding, operands) if s is not None]
  if not shardings:
    return jnp.einsum(subscripts, *operands)
  out_sharding = NamedSharding(shardings[0].mesh, to_spec(out_axes))
  return jnp.einsum(subscripts, *operands, out_sharding=out_sharding)


def zeros(shape, dtype, like: Optional[jax.Array] = None,
          axes_per_dim: Optional[Sequence[tuple[str, ...]]] = None) -> jax.Array:
  """Zeros placed like ``like``'s mesh with ``axes_per_dim`` (when ``like`` is explicit)."""
  sharding = None if like is None else explicit_sharding(like)
  if sharding is None or axes_per_dim is None:
    return jnp.zeros(shape, dtype)
  return jnp.zeros(shape, dtype, out_sharding=NamedSharding(sharding.mesh, to_spec(axes_per_dim)))
