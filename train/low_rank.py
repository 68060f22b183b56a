"""Low-rank pretraining: the projected kernels are products ``W = A B`` of trained factors.

The "Low-Rank" baseline of the GaLore and Natural GaLore papers' pretraining tables: every kernel
the mask selects (``models.llama.galore_mask`` unless given: the attention and MLP kernels) is
replaced by two factors ``A`` (in x r) and ``B`` (r x out) trained from scratch, and the model
computes with

.. math::
  W = A B

(one ``in x r x out`` product per kernel in every forward pass; the gradient reaches ``A`` and
``B`` through it). Unlike :class:`train.lora.LoRA` there is no base: the dense kernels are not
held at all, and the other parameters (embeddings, norms, the output projection) train densely.
The held tree is ``{"factors": ..., "others": ...}``, all of it trainable, so AdamW's moments
cover the factors and the other parameters only.

Initialisation: both factors are drawn from ``N(0, s^2)`` with ``s^2 = init_std / sqrt(r)``. The
entries of the product then have mean 0 and variance ``r s^4 = init_std^2``, the variance of the
dense initialiser (``models.layers.DEFAULT_INIT_STD``, Hugging Face's ``N(0, 0.02)``), so the
model's activations start at the scale a dense model's do; ``A`` and ``B`` are equally scaled so
neither factor's gradient dominates at the start.

Examples:
  >>> import jax, jax.numpy as jnp
  >>> params = {"blocks": {0: {"attn": {"q": {"kernel": jnp.ones((8, 4))}}}},
  ...           "embed": {"embedding": jnp.ones((16, 8))}}
  >>> low_rank = LowRank(rank=2)
  >>> held = low_rank.init(params, jax.random.key(0))
  >>> sorted(held), held["factors"]["blocks"][0]["attn"]["q"]["kernel"]["b"].shape
  (['factors', 'others'], (2, 4))
  >>> low_rank.merge(held)["blocks"][0]["attn"]["q"]["kernel"].shape
  (8, 4)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from train import lora as lora_lib

FACTOR_A = "a"
FACTOR_B = "b"


def factor_std(init_std: float, rank: int) -> float:
  """The standard deviation of each factor so that ``A B``'s entries have ``init_std``.

  Examples:
    >>> round(factor_std(0.02, 4) ** 4 * 4, 8)  # r s^4 = init_std^2
    0.0004
  """
  return math.sqrt(init_std / math.sqrt(rank))


def factored_paths(factors: Any) -> list[lora_lib.Path]:
  """The paths (in the model parameters) of the kernels held as factor pairs."""
  return [path[:-1] for path, _ in lora_lib.leaf_paths(factors) if path and path[-1] == FACTOR_A]


@dataclasses.dataclass(frozen=True)
class LowRank:
  """Masked kernels held as trained factor pairs ``W = A B``; see the module doc.

  Attributes:
    rank: ``r``, the inner dimension of each pair (clipped to ``min(in, out)``).
    init_std: the standard deviation of the dense initialiser the product's entries match.
    projected: which kernels are factorised: a function of the parameters returning a tree of
      bools (``models.llama.galore_mask`` unless given).
  """

  rank: int
  init_std: Optional[float] = None
  projected: Optional[Callable[[Any], Any]] = None

  def __post_init__(self):
    if not (isinstance(self.rank, int) and self.rank >= 1):
      raise ValueError(f"`rank` must be an integer >= 1, got {self.rank}")
    if self.init_std is not None and not (math.isfinite(self.init_std) and self.init_std > 0):
      raise ValueError(f"`init_std` must be finite and > 0, got {self.init_std}")

  def _mask(self, params: Any) -> Any:
    if self.projected is not None:
      return self.projected(params)
    from models import llama  # pylint: disable=import-outside-toplevel
    return llama.galore_mask(params)

  def _init_std(self) -> float:
    if self.init_std is not None:
      return self.init_std
    from models import layers  # pylint: disable=import-outside-toplevel
    return layers.DEFAULT_INIT_STD

  def _paths(self, params: Any) -> list[lora_lib.Path]:
    return [path for path, on in lora_lib.leaf_paths(self._mask(params)) if on is True]

  def init(self, params: Any, key: jax.Array) -> dict:
    """``{"factors": ..., "others": ...}``: Gaussian factors; the dense kernels are dropped.

    Each pair is drawn from ``fold_in(key, i)`` with ``i`` the kernel's index among the factorised
    ones (``A`` and ``B`` from that key's two halves), so a draw does not depend on sharding.
    """
    paths = self._paths(params)
    factors: dict = {}
    for index, path in enumerate(paths):
      kernel = lora_lib.get_path(params, path)
      if len(kernel.shape) != 2:
        raise ValueError(f"low_rank factorises 2-D kernels; {'/'.join(map(str, path))} has "
                         f"shape {tuple(kernel.shape)}")
      fan_in, fan_out = kernel.shape
      rank = min(self.rank, fan_in, fan_out)
      std = factor_std(self._init_std(), rank)
      key_a, key_b = jax.random.split(jax.random.fold_in(key, index))
      a = std * jax.random.normal(key_a, (fan_in, rank), jnp.float32)
      b = std * jax.random.normal(key_b, (rank, fan_out), jnp.float32)
      lora_lib.set_path(factors, path, {FACTOR_A: a.astype(kernel.dtype),
                                        FACTOR_B: b.astype(kernel.dtype)})
    chosen = set(paths)
    others = lora_lib._select(params, lambda path: path not in chosen)  # pylint: disable=protected-access
    return {"factors": factors, "others": others}

  def split(self, held: dict) -> tuple[dict, dict]:
    """Everything is trained: ``(held, {})``."""
    return held, {}

  def combine(self, trainable: dict, frozen: dict) -> dict:
    del frozen
    return trainable

  def merge(self, held: dict) -> dict:
    """The model parameters: the other leaves, and ``A B`` (float32 product) for each pair."""
    out: dict = {}
    for path, leaf in lora_lib.leaf_paths(held["others"]):
      lora_lib.set_path(out, path, leaf)
    for path in factored_paths(held["factors"]):
      pair = lora_lib.get_path(held["factors"], path)
      product = jnp.matmul(pair[FACTOR_A], pair[FACTOR_B], preferred_element_type=jnp.float32)
      lora_lib.set_path(out, path, product.astype(pair[FACTOR_A].dtype))
    return out

  def shardings(self, param_shardings: Any) -> dict:
    """``A`` is split like the kernel's rows, ``B`` like its columns; the others keep theirs."""
    paths = self._paths(param_shardings)
    factors: dict = {}
    for path in paths:
      sharding = lora_lib.get_path(param_shardings, path)
      spec = tuple(sharding.spec) + (None,) * (2 - len(sharding.spec))
      lora_lib.set_path(factors, path, {
          FACTOR_A: NamedSharding(sharding.mesh, P(spec[0], None)),
          FACTOR_B: NamedSharding(sharding.mesh, P(None, spec[1]))})
    chosen = set(paths)
    others = lora_lib._select(param_shardings, lambda path: path not in chosen)  # pylint: disable=protected-access
    return {"factors": factors, "others": others}
