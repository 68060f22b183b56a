"""Device mesh and shardings for parameters, optimizer state and batches.

The mesh always has the three axes ``data``, ``fsdp`` and ``tensor`` (size 1
when unused), with ``Auto`` axis types: an Explicit mesh breaks the SVD of
``optax.contrib.galore`` ("Input 0 to svd must be unsharded on non-batch
dimensions"). Batches are split over
the data axis (and fsdp under FSDP) as ``models.llama.batch_spec`` says;
parameters follow ``models.llama.partition_specs``;
optimizer state gets shardings of its own from ``ngalore_jax.state_shardings``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from models import llama
from train.config import MESH_AXES, ConfigError, parse_mesh


def make_mesh(spec: Optional[str], devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """Builds the ``(data, fsdp, tensor)`` mesh described by ``--mesh``.

  Args:
    spec: e.g. ``"data=2,fsdp=4"``; missing axes have size 1; ``None`` puts all
      devices on ``data``.
    devices: the devices to use (default ``jax.devices()``). A mesh smaller
      than the device list takes the first devices (single process only).

  Returns:
    A ``jax.sharding.Mesh`` with Auto axis types.

  Raises:
    ConfigError: if the mesh needs more devices than there are, or fewer in a
      multi-process run.
  """
  devices = list(devices if devices is not None else jax.devices())
  axes = parse_mesh(spec) or {"data": len(devices)}
  shape = tuple(axes.get(name, 1) for name in MESH_AXES)
  size = math.prod(shape)
  if size > len(devices):
    raise ConfigError(f"--mesh {spec}: needs {size} devices, only {len(devices)} available")
  if size < len(devices) and jax.process_count() > 1:
    raise ConfigError(f"--mesh {spec}: a multi-process mesh must use all {len(devices)} devices")
  return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices[:size])


def strategy(mesh: Mesh) -> str:
  """The ``models.llama.partition_specs`` strategy implied by the mesh axes."""
  fsdp, tensor = mesh.shape["fsdp"] > 1, mesh.shape["tensor"] > 1
  return {(False, False): "dp", (True, False): "fsdp",
          (False, True): "tp", (True, True): "fsdp_tp"}[(fsdp, tensor)]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Token batches ``[B, T]``: B split as ``models.llama.batch_spec`` says."""
  return NamedSharding(mesh, llama.batch_spec(strategy(mesh), mesh=mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(mesh: Mesh, batch_size: int) -> None:
  """Raises ConfigError unless the batch splits evenly over its mesh axes."""
  ways = math.prod(mesh.shape[a] for a in _batch_axes(mesh))
  if batch_size % ways:
    raise ConfigError(f"--batch-size {batch_size} must be a multiple of {ways}"
                      f" (the mesh's {' x '.join(_batch_axes(mesh))} axes)")


def _batch_axes(mesh: Mesh) -> tuple[str, ...]:
  entry = batch_sharding(mesh).spec[0]
  return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def param_shardings(mesh: Mesh, abstract_params: Any) -> Any:
  """NamedShardings for parameters from ``models.llama.partition_specs``.

  Mesh axes that do not divide a dimension are dropped (that dimension is
  replicated).
  """
  specs = llama.partition_specs(abstract_params, strategy(mesh), mesh=mesh)
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                      is_leaf=lambda x: isinstance(x, P))


def with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying ``.sharding`` (the input of ng.state_shardings)."""
  return jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def state_shardings(tx: Any, abstract_params: Any) -> Any:
  """Shardings for ``tx.init(params)``.

  Uses ``ngalore_jax.state_shardings`` (low-rank state, projectors and history
  get shardings of their own). If it cannot describe ``tx`` it falls back to
  the shardings XLA propagates through ``jax.jit(tx.init)``.

  Args:
    tx: the optax transformation.
    abstract_params: ShapeDtypeStructs with ``.sharding`` set.

  Returns:
    A pytree of shardings matching ``jax.eval_shape(tx.init, abstract_params)``.
  """
  try:
    import ngalore_jax  # pylint: disable=import-outside-toplevel
    return ngalore_jax.state_shardings(tx, abstract_params)
  except (ImportError, AttributeError, NotImplementedError, TypeError, ValueError) as e:
    logging.getLogger(__name__).info(
        "ngalore_jax.state_shardings cannot describe this optimizer (%s: %s); using the "
        "optimizer-state shardings XLA propagates", type(e).__name__, e)
  in_shardings = jax.tree.map(lambda a: a.sharding, abstract_params)
  mesh = jax.tree.leaves(in_shardings)[0].mesh
  compiled = jax.jit(tx.init, in_shardings=(in_shardings,)).lower(abstract_params).compile()
  # Leaves that do not depend on the parameters (counters) come back on one device.
  return jax.tree.map(
      lambda s: s if isinstance(s, NamedSharding) and s.mesh == mesh else replicated(mesh),
      compiled.output_shardings)


def put_batch(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """Places a host batch (the same global array on every process) on the mesh."""
  return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
