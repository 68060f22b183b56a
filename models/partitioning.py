"""Which LLaMA weights GaLore projects, and how each weight is laid out on a device mesh.

Both answers are read from the parameter paths of :func:`models.llama.split_params`
(``params["blocks"][i]["attn"]["q"]["kernel"]`` and so on), so the helpers work on
the arrays, on ``jax.ShapeDtypeStruct`` trees and on any tree with the same keys.

Logical axes (one name per array dimension):

==================  ==========================  =========================
weight              shape                       logical axes
==================  ==========================  =========================
embed.embedding     (vocab, hidden)             ("vocab", "embed")
attn.q.kernel       (hidden, heads*head_dim)    ("embed", "heads")
attn.k/v.kernel     (hidden, kv_heads*head_dim) ("embed", "kv_heads")
attn.o.kernel       (heads*head_dim, hidden)    ("heads", "embed")
mlp.gate/up.kernel  (hidden, ffn)               ("embed", "mlp")
mlp.down.kernel     (ffn, hidden)               ("mlp", "embed")
lm_head.kernel      (hidden, vocab)             ("embed", "vocab")
*_norm.scale        (hidden,)                   ("norm",)
==================  ==========================  =========================

Strategies map logical axes to mesh axes (unlisted logical axes are replicated):

- ``"dp"``: parameters replicated; the batch is split over ``data_axis``.
- ``"fsdp"``: ``embed`` over ``fsdp_axis`` (ZeRO-3 style); batch over data and fsdp.
- ``"tp"``: ``heads``, ``kv_heads``, ``mlp``, ``vocab`` over ``tensor_axis``
  (Megatron column/row split); batch over data.
- ``"fsdp_tp"``: both of the above.

Mesh axis types: under an ``AxisType.Auto`` mesh, XLA's partitioner picks the
collectives (true tensor-parallel compute). Under an ``AxisType.Explicit`` mesh
(``jax.make_mesh``'s default), the model all-gathers each weight before use
(:func:`models.layers.gather_weight`): the layouts above still shard storage,
parameter gradients come back in them, and compute is data parallel.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec

GALORE_MODULES = frozenset({"q", "k", "v", "o", "gate", "up", "down"})
STRATEGIES = ("dp", "fsdp", "tp", "fsdp_tp")

_LOGICAL_AXES = {
    ("embed", "embedding"): ("vocab", "embed"),
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"),
    ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("attn_norm", "scale"): ("norm",),
    ("mlp_norm", "scale"): ("norm",),
    ("final_norm", "scale"): ("norm",),
}


def _key_name(key: Any) -> Any:
  for attr in ("key", "name", "idx"):
    if hasattr(key, attr):
      return getattr(key, attr)
  return key


def _names(path: tuple[Any, ...]) -> tuple[Any, ...]:
  return tuple(_key_name(k) for k in path)


def _is_variable(x: Any) -> bool:
  # Stop at nnx variables: their value sits one key deeper (GetAttrKey "value").
  return isinstance(x, nnx.Variable)


def is_galore_path(path: tuple[Any, ...]) -> bool:
  """True for the ``kernel`` of an attention (q/k/v/o) or MLP (gate/up/down) projection."""
  names = _names(path)
  return len(names) >= 2 and names[-1] == "kernel" and names[-2] in GALORE_MODULES


def galore_mask(params: Any) -> Any:
  """A tree like ``params`` with ``True`` on the weights GaLore should project.

  Attention q/k/v/o and MLP gate/up/down kernels are projected; the embedding,
  the lm_head and the norm scales are not. The function itself can be passed
  as a callable ``mask`` to ``optax.masked`` or the ``ngalore_jax`` aliases.

  Args:
    params: the nested-dict parameters of :func:`models.llama.split_params`
      (arrays or ``jax.ShapeDtypeStruct``), or an ``nnx.State`` of the model's
      ``nnx.Param`` variables (what ``nnx.Optimizer`` passes to ``tx.init``).

  Returns:
    The same tree structure with ``bool`` leaves (one per ``nnx.Variable``, in
    place of the variable, for an ``nnx.State``).

  Examples:
    >>> from models import llama
    >>> cfg = llama.CONFIGS["tiny"]
    >>> _, params = llama.abstract_params(cfg)
    >>> mask = llama.galore_mask(params)
    >>> mask["blocks"][0]["attn"]["q"]["kernel"], mask["lm_head"]["kernel"]
    (True, False)
    >>> from flax import nnx
    >>> model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
    >>> llama.galore_mask(nnx.state(model, nnx.Param))["blocks"][0]["attn"]["q"]["kernel"]
    True
  """
  return jax.tree_util.tree_map_with_path(lambda path, _: is_galore_path(path), params,
                                          is_leaf=_is_variable)


def galore_labels(params: Any, *, galore: str = "galore", other: str = "adamw") -> Any:
  """Like :func:`galore_mask` with string labels, for ``optax.partition``.

  Args:
    params: the nested-dict parameters of :func:`models.llama.split_params`.
    galore: label of the projected weights.
    other: label of every other weight.

  Returns:
    The same tree structure with ``str`` leaves.
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: galore if is_galore_path(path) else other, params, is_leaf=_is_variable)


def _leaf_logical_axes(path: tuple[Any, ...], leaf: Any) -> tuple[str, ...]:
  names = _names(path)
  where = "/".join(map(str, names))
  if names[-2:] not in _LOGICAL_AXES:
    raise KeyError(f"no logical axes for parameter {where}")
  axes = _LOGICAL_AXES[names[-2:]]
  if len(axes) != len(leaf.shape):
    raise ValueError(f"parameter {where} has shape {leaf.shape}, expected {len(axes)} dims")
  return axes


def logical_axes(params: Any) -> Any:
  """A tree like ``params`` whose leaves are tuples of logical axis names (module doc).

  Raises:
    KeyError: for a leaf whose path is not a LLaMA parameter.
  """
  return jax.tree_util.tree_map_with_path(_leaf_logical_axes, params)


def logical_axis_rules(
    strategy: str,
    *,
    data_axis: str = "data",
    fsdp_axis: str = "fsdp",
    tensor_axis: str = "tensor",
) -> dict[str, tuple[str, ...]]:
  """The logical-to-mesh axis mapping of a strategy, including the ``"batch"`` axis.

  Args:
    strategy: one of ``"dp"``, ``"fsdp"``, ``"tp"``, ``"fsdp_tp"``.
    data_axis: mesh axis of pure data parallelism.
    fsdp_axis: mesh axis over which parameters (and the batch) are sharded.
    tensor_axis: mesh axis of tensor (model) parallelism.

  Returns:
    ``{logical_name: (mesh_axis, ...)}``; unmapped names are replicated.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
  rules: dict[str, tuple[str, ...]] = {"batch": (data_axis,)}
  if "fsdp" in strategy:
    rules["embed"] = (fsdp_axis,)
    rules["batch"] = tuple(dict.fromkeys((data_axis, fsdp_axis)))
  if "tp" in strategy:
    for name in ("heads", "kv_heads", "mlp", "vocab"):
      rules[name] = (tensor_axis,)
  return rules


def _spec(
    axes: tuple[str, ...],
    shape: tuple[int, ...],
    rules: Mapping[str, tuple[str, ...]],
    mesh_shape: Mapping[str, int] | None,
) -> PartitionSpec:
  """Maps logical axes to a PartitionSpec, dropping mesh axes the mesh cannot honour."""
  entries = []
  for name, dim in zip(axes, shape):
    mesh_axes = rules.get(name, ())
    if mesh_shape is not None:
      mesh_axes = tuple(a for a in mesh_axes if a in mesh_shape)
      size = 1
      for a in mesh_axes:
        size *= mesh_shape[a]
      if dim % size:
        mesh_axes = ()
    if not mesh_axes:
      entries.append(None)
    elif len(mesh_axes) == 1:
      entries.append(mesh_axes[0])
    else:
      entries.append(mesh_axes)
  return PartitionSpec(*entries)


def partition_specs(
    params: Any,
    strategy: str = "dp",
    *,
    data_axis: str = "data",
    fsdp_axis: str = "fsdp",
    tensor_axis: str = "tensor",
    mesh: jax.sharding.Mesh | None = None,
) -> Any:
  """One ``PartitionSpec`` per parameter for a parallelism strategy.

  Each dimension's logical axis (module doc) is mapped to mesh axes by
  :func:`logical_axis_rules`. Without ``mesh`` the specs name the mesh axes
  as given, and the caller's mesh must have them and divide the dimensions. With
  ``mesh``, a mesh axis that the mesh lacks, or whose size does not divide the
  dimension (e.g. the 1b preset's ffn 5461 on a tensor axis of 2), is dropped
  and that dimension is replicated.

  Args:
    params: the nested-dict parameters of :func:`models.llama.split_params`
      (arrays or ``jax.ShapeDtypeStruct``).
    strategy: ``"dp"``, ``"fsdp"``, ``"tp"`` or ``"fsdp_tp"``.
    data_axis: mesh axis name for data parallelism.
    fsdp_axis: mesh axis name for parameter sharding.
    tensor_axis: mesh axis name for tensor parallelism.
    mesh: optional mesh whose axis names and sizes the specs must fit.

  Returns:
    The same tree structure with ``jax.sharding.PartitionSpec`` leaves.

  Examples:
    >>> from models import llama
    >>> _, params = llama.abstract_params(llama.CONFIGS["tiny"])
    >>> specs = llama.partition_specs(params, "fsdp_tp")
    >>> specs["blocks"][0]["mlp"]["down"]["kernel"]
    P('tensor', 'fsdp')
  """
  rules = logical_axis_rules(strategy, data_axis=data_axis, fsdp_axis=fsdp_axis,
                             tensor_axis=tensor_axis)
  mesh_shape = dict(mesh.shape) if mesh is not None else None
  return jax.tree_util.tree_map_with_path(
      lambda path, leaf: _spec(_leaf_logical_axes(path, leaf), tuple(leaf.shape), rules,
                               mesh_shape),
      params)


def batch_spec(
    strategy: str = "dp",
    *,
    data_axis: str = "data",
    fsdp_axis: str = "fsdp",
    tensor_axis: str = "tensor",
    mesh: jax.sharding.Mesh | None = None,
) -> PartitionSpec:
  """The ``PartitionSpec`` of a ``[batch, seq]`` token array under a strategy.

  The batch is split over the data axis, and also over the fsdp axis for the
  FSDP strategies; the sequence is not split. ``mesh`` drops absent axes as in
  :func:`partition_specs` (divisibility is the caller's business here).
  """
  rules = logical_axis_rules(strategy, data_axis=data_axis, fsdp_axis=fsdp_axis,
                             tensor_axis=tensor_axis)
  batch_axes = rules["batch"]
  if mesh is not None:
    batch_axes = tuple(a for a in batch_axes if a in mesh.shape)
  if not batch_axes:
    return PartitionSpec(None, None)
  return PartitionSpec(batch_axes[0] if len(batch_axes) == 1 else batch_axes, None)
