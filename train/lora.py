"""Reparametrised training: the optimizer updates a function of the model's weights, not them.

A :class:`Parametrization` says what a run holds in ``TrainState.params`` (the *held* tree), which
part of it the optimizer trains and which part stays frozen, and how the model's weights are
computed from it for every forward pass. Plain training has no parametrisation: the held tree is
the model's parameters, all of them trained. The train step (:func:`train.steps.make_train_step`),
the evaluator, checkpoints and resume work on the held tree, so a parametrisation changes nothing
else in a run.

:class:`LoRA` (Hu et al., 2021) holds ``{"base": params, "adapters": ...}``: for every kernel the
mask selects (by default ``models.llama.galore_mask``, the attention and MLP kernels GaLore
projects) a pair ``A`` (in x r) and ``B`` (r x out), and the model computes with

.. math::
  W = W_0 + \\frac{\\alpha}{r} A B

merged functionally in every step (one ``in x r x out`` product per kernel; the gradient reaches
``A`` and ``B`` through it). ``B`` starts at zero, so the adapted model starts equal to the base;
``A`` is drawn like PyTorch's ``nn.Linear`` default (Kaiming-uniform with ``a = sqrt(5)``, i.e.
``U(-1/sqrt(in), 1/sqrt(in))``), as PEFT's LoRA does. The base stays frozen; the parameters
without adapters (embeddings, norms, the output projection) stay frozen too, or are trained with
the optimizer (``others="trained"``, what pretraining from scratch needs).

The held tree is the same whatever is trained, so checkpoints keep the base (a later
parametrisation such as ReLoRA, which merges the adapters into the base from time to time, needs
it there) and the optimizer state covers only the trainable part: for LoRA, the adapters' Adam
moments (:func:`memory_bytes` counts them with :func:`ngalore_jax.optimizer_state_bytes`, like
every other optimizer's state).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> params = {"blocks": {0: {"attn": {"q": {"kernel": jnp.ones((8, 4))}}}},
  ...           "embed": {"embedding": jnp.ones((16, 8))}}
  >>> lora = LoRA(rank=2, alpha=4.0)
  >>> held = lora.init(params, jax.random.key(0))
  >>> held["adapters"]["blocks"][0]["attn"]["q"]["kernel"]["lora_a"].shape
  (8, 2)
  >>> trainable, frozen = lora.split(held)
  >>> sorted(trainable), sorted(frozen)
  (['adapters'], ['base'])
  >>> bool(jnp.all(lora.merge(held)["blocks"][0]["attn"]["q"]["kernel"] == 1.0))  # B = 0
  True
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Iterator, Optional, Protocol

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LORA_A = "lora_a"
LORA_B = "lora_b"
OTHERS = ("frozen", "trained")

Path = tuple[Any, ...]


class Parametrization(Protocol):
  """What ``TrainState.params`` holds, what is trained, and the weights the model computes with.

  Every method is a pure function of pytrees (usable inside ``jax.jit``); ``split`` and
  ``combine`` depend only on the tree's structure, so they also apply to a tree of shardings or
  of ``jax.ShapeDtypeStruct`` laid out like the held tree.

  A parametrisation may also define ``after_update(step, held, opt_state, key) -> (held,
  opt_state)``, applied by the train step after every update (:class:`train.relora.ReLoRA`'s
  periodic merge); :class:`train.low_rank.LowRank` factorises the kernels with no base at all.
  """

  def init(self, params: Any, key: jax.Array) -> Any:
    """The held tree of a run that starts from the model parameters ``params``."""

  def split(self, held: Any) -> tuple[Any, Any]:
    """``(trainable, frozen)``: the optimizer sees ``trainable`` only."""

  def combine(self, trainable: Any, frozen: Any) -> Any:
    """The inverse of :meth:`split`."""

  def merge(self, held: Any) -> Any:
    """The model parameters (``models.llama`` layout) the forward pass uses."""

  def shardings(self, param_shardings: Any) -> Any:
    """Shardings of the held tree from those of the model parameters."""


def _is_dict(x: Any) -> bool:
  return isinstance(x, dict)


def leaf_paths(tree: Any, prefix: Path = ()) -> Iterator[tuple[Path, Any]]:
  """``(path, leaf)`` for every leaf of a nested dict (anything not a dict is a leaf).

  Examples:
    >>> list(leaf_paths({"a": {0: 1, 1: {"b": 2}}}))
    [(('a', 0), 1), (('a', 1, 'b'), 2)]
  """
  if _is_dict(tree):
    for key, value in tree.items():
      yield from leaf_paths(value, prefix + (key,))
  else:
    yield prefix, tree


def get_path(tree: Any, path: Path) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def set_path(tree: dict, path: Path, value: Any) -> None:
  """Sets ``tree[path[0]]...[path[-1]] = value``, creating dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _select(tree: Any, keep: Callable[[Path], bool]) -> dict:
  """The nested dict of the leaves of ``tree`` whose path ``keep`` accepts (order kept)."""
  out: dict = {}
  for path, leaf in leaf_paths(tree):
    if keep(path):
      set_path(out, path, leaf)
  return out


def _union(a: dict, b: dict) -> dict:
  """The leaves of two disjoint nested dicts as one (``jax.tree`` sorts dict keys anyway)."""
  out: dict = {}
  for part in (a, b):
    for path, leaf in leaf_paths(part):
      set_path(out, path, leaf)
  return out


def adapted_paths(adapters: Any) -> list[Path]:
  """The paths (in the model parameters) of the kernels that carry an adapter pair."""
  return [path[:-1] for path, _ in leaf_paths(adapters) if path and path[-1] == LORA_A]


@dataclasses.dataclass(frozen=True)
class LoRA:
  """Low-rank adapters on the masked kernels; see the module doc.

  Attributes:
    rank: ``r``, the inner dimension of each adapter pair (clipped to ``min(in, out)``).
    alpha: the LoRA scale numerator: the update is ``alpha / r * A B``.
    others: ``"frozen"`` (classic LoRA: only the adapters train) or ``"trained"`` (the
      parameters without adapters train with the optimizer too).
    projected: which kernels get adapters: a function of the parameters returning a tree of
      bools (``models.llama.galore_mask`` unless given).
  """

  rank: int
  alpha: float
  others: str = "frozen"
  projected: Optional[Callable[[Any], Any]] = None

  def __post_init__(self):
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ValueError(f"`rank` must be an integer >= 1, got {self.rank}")
    if not (math.isfinite(self.alpha) and self.alpha > 0):
      raise ValueError(f"`lora_alpha` must be finite and > 0, got {self.alpha}")
    if self.others not in OTHERS:
      raise ValueError(f"`lora_others` must be one of {', '.join(OTHERS)}, got {self.others!r}")

  def _mask(self, params: Any) -> Any:
    if self.projected is not None:
      return self.projected(params)
    from models import llama  # pylint: disable=import-outside-toplevel
    return llama.galore_mask(params)

  def scale(self, kernel_shape: tuple[int, ...]) -> float:
    """``alpha / r`` with ``r`` the rank this kernel's adapters have."""
    return self.alpha / min(self.rank, *kernel_shape)

  def init(self, params: Any, key: jax.Array) -> dict:
    """``{"base": params, "adapters": ...}`` with ``B = 0`` and Kaiming-uniform ``A``.

    Each kernel's ``A`` is drawn from ``fold_in(key, i)`` with ``i`` its index among the adapted
    kernels, so the draw does not depend on sharding or on other kernels' shapes.
    """
    mask = self._mask(params)
    adapters: dict = {}
    paths = [path for path, on in leaf_paths(mask) if on is True]
    for index, path in enumerate(paths):
      kernel = get_path(params, path)
      if len(kernel.shape) != 2:
        raise ValueError(f"LoRA adapts 2-D kernels; {'/'.join(map(str, path))} has shape "
                         f"{tuple(kernel.shape)}")
      fan_in, fan_out = kernel.shape
      rank = min(self.rank, fan_in, fan_out)
      bound = 1.0 / math.sqrt(fan_in)
      a = jax.random.uniform(jax.random.fold_in(key, index), (fan_in, rank), jnp.float32,
                             -bound, bound).astype(kernel.dtype)
      b = jnp.zeros((rank, fan_out), kernel.dtype)
      set_path(adapters, path, {LORA_A: a, LORA_B: b})
    return {"base": params, "adapters": adapters}

  def split(self, held: dict) -> tuple[dict, dict]:
    if self.others == "frozen":
      return {"adapters": held["adapters"]}, {"base": held["base"]}
    adapted = set(adapted_paths(held["adapters"]))
    others = _select(held["base"], lambda path: path not in adapted)
    kernels = _select(held["base"], lambda path: path in adapted)
    return {"adapters": held["adapters"], "others": others}, {"base": kernels}

  def combine(self, trainable: dict, frozen: dict) -> dict:
    if self.others == "frozen":
      return {"base": frozen["base"], "adapters": trainable["adapters"]}
    base = _union(frozen["base"], trainable["others"])
    return {"base": base, "adapters": trainable["adapters"]}

  def merge(self, held: dict) -> dict:
    """The base with every adapted kernel replaced by ``W0 + alpha / r * A B``."""
    base = held["base"]
    adapted = {path: get_path(held["adapters"], path) for path in adapted_paths(held["adapters"])}

    def leaf(path: Path, value: Any) -> Any:
      pair = adapted.get(path)
      if pair is None:
        return value
      delta = jnp.matmul(pair[LORA_A], pair[LORA_B], preferred_element_type=jnp.float32)
      return (value.astype(jnp.float32) + self.scale(value.shape) * delta).astype(value.dtype)

    return _map_with_path(leaf, base)

  def shardings(self, param_shardings: Any) -> dict:
    """The base keeps its shardings; ``A`` is split like the kernel's rows, ``B`` its columns."""
    mask = self._mask(param_shardings)
    adapters: dict = {}
    for path, on in leaf_paths(mask):
      if on is not True:
        continue
      sharding = get_path(param_shardings, path)
      spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
      adapters_of = {LORA_A: NamedSharding(sharding.mesh, P(spec[0], None)),
                     LORA_B: NamedSharding(sharding.mesh, P(None, spec[1]))}
      set_path(adapters, path, adapters_of)
    return {"base": param_shardings, "adapters": adapters}


def _map_with_path(fn: Callable[[Path, Any], Any], tree: Any, prefix: Path = ()) -> Any:
  if _is_dict(tree):
    return {key: _map_with_path(fn, value, prefix + (key,)) for key, value in tree.items()}
  return fn(prefix, tree)


def memory_bytes(held: Any, opt_state: Any, parametrization: Optional[Parametrization]) -> dict:
  """Bytes of what a run holds: the model, the trainable part and the optimizer state.

  Works on concrete or abstract (``jax.eval_shape``) trees.

  Args:
    held: ``TrainState.params``.
    opt_state: ``TrainState.opt_state``.
    parametrization: the run's parametrisation, or ``None``.

  Returns:
    ``{"params": ..., "trainable_params": ..., "frozen_params": ..., "adapters": ...,
    "optimizer_state": {category: bytes, ..., "total": ...}}`` (``adapters`` is 0 without LoRA).
  """
  import ngalore_jax as ng  # pylint: disable=import-outside-toplevel
  if parametrization is None:
    trainable, frozen = held, {}
  else:
    trainable, frozen = parametrization.split(held)
  adapters = held.get("adapters", {}) if parametrization is not None and _is_dict(held) else {}
  return {
      "params": ng.tree_bytes(held),
      "trainable_params": ng.tree_bytes(trainable),
      "frozen_params": ng.tree_bytes(frozen),
      "adapters": ng.tree_bytes(adapters),
      "optimizer_state": ng.optimizer_state_bytes(opt_state),
  }
