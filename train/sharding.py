"""Device mesh and shardings for parameters, optimizer state and batches.

The mesh always has the three axes ``data``, ``fsdp`` and ``tensor`` (size 1
when unused), with ``Auto`` axis types: an Explicit mesh breaks the SVD of
``optax.contrib.galore`` ("Input 0 to svd must be unsharded on non-batch
dimensions"). Batches are split over
the data axis (and fsdp under FSDP) as ``models.llama.batch_spec`` says;
parameters follow ``models.llama.partition_specs``;
optimizer state gets shardings of its own from ``ngalore_jax.state_shardings``.
:func:`collective_bytes` measures what a compiled program's collectives move.
"""

from __future__ import annotations

import logging
import math
import re
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


COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")

# `%name = <shape> <opcode>(<operands>)`; the shape is an array or a (nested) tuple of arrays.
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*(.+?)\s+([a-z][\w-]*)\((.*)$")
_ARRAY = re.compile(r"\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]")
_NAME = re.compile(r"%?([\w.-]+)\s*$")


def _element_bytes(dtype: str) -> int:
  """Bytes per element of an HLO element type (``f32``, ``bf16``, ``pred``, ``f8e4m3fn``)."""
  if dtype == "pred":
    return 1
  bits = re.match(r"[a-z]+(\d+)", dtype)
  return max(1, int(bits.group(1)) // 8) if bits else 0  # `token[]` and the like: 0


def _shape_bytes(shape: str) -> int:
  """Bytes of an HLO shape string (a tuple counts all its arrays)."""
  return sum(_element_bytes(dtype) * math.prod(int(d) for d in dims.split(",") if d)
             for dtype, dims in _ARRAY.findall(shape))


def _operands(text: str) -> list[str]:
  """Top-level operands of an instruction: the text up to its closing parenthesis, split."""
  depth, end = 0, len(text)
  for i, ch in enumerate(text):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if depth < 0:
      end = i
      break
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text[:end]):
    depth += ch in "([{"
    depth -= ch in ")]}"
    if ch == "," and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  parts.append(text[start:end])
  return [p.strip() for p in parts if p.strip()]


def collective_bytes(compiled: Any) -> dict[str, int]:
  """Bytes each kind of collective moves, per device, in a compiled SPMD program.

  Reads the HLO text of the partitioned program (shapes there are per device).
  Each collective counts the larger of its operands and its result: the
  gathered array for an all-gather, the input for a reduce-scatter, the buffer
  for an all-reduce, all-to-all or collective-permute. An asynchronous pair
  (``all-gather-start`` / ``all-gather-done``) counts once, from its ``-done``
  result. Every instruction counts once: a collective in a loop body is not
  multiplied by the trip count, and both branches of a conditional count.

  Args:
    compiled: a ``jax.stages.Compiled`` (``jax.jit(f).lower(...).compile()``),
      or its ``as_text()``.

  Returns:
    ``{kind: bytes}`` for every kind in ``COLLECTIVES`` (0 when absent).

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> collective_bytes(jax.jit(jnp.sin).lower(jnp.zeros(4)).compile())["all-reduce"]
    0
  """
  text = compiled if isinstance(compiled, str) else compiled.as_text()
  shapes, found = {}, []
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match is None:
      continue
    name, shape, opcode, rest = match.groups()
    shapes[name] = shape
    done = opcode.endswith("-done")  # its operand is the `-start` tuple: count the result
    kind = opcode[:-len("-done")] if done else opcode
    if kind in COLLECTIVES:
      found.append((kind, shape, [] if done else _operands(rest)))
  totals = dict.fromkeys(COLLECTIVES, 0)
  for kind, shape, operands in found:
    operand_bytes = 0
    for operand in operands:
      # `%name` (typed by its own instruction), or `<shape> %name` in some printers.
      typed = _shape_bytes(operand)
      name = _NAME.search(operand)
      operand_bytes += typed or _shape_bytes(shapes.get(name.group(1) if name else "", ""))
    totals[kind] += max(_shape_bytes(shape), operand_bytes)
  return totals
