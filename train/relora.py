"""ReLoRA (Lialin et al., 2023, arXiv:2307.05695): LoRA whose adapters are merged periodically.

The held tree is :class:`train.lora.LoRA`'s ``{"base": params, "adapters": ...}`` with the
parameters without adapters (embeddings, norms, the output projection) trained by the optimizer
(``others="trained"``: pretraining from scratch). The adapted kernels train only through merges:
every ``reset_every`` steps (when the step count after an update is a multiple of it),

1. the adapters are merged into the base: ``W0 <- W0 + alpha / r * A B`` (the same float32
   product and cast as :meth:`train.lora.LoRA.merge`, so the model's weights do not change);
2. the adapters are re-initialised: ``B = 0`` and a fresh Kaiming-uniform ``A`` (drawn from the
   run's rng, so the draw is part of the state and a resumed run repeats it), so the model is
   still unchanged right after the reset;
3. the adapters' optimizer state is partially reset by magnitude pruning: in every leaf of the
   state laid out like the adapters (Adam's first and second moments), the ``floor(prune * n)``
   entries of smallest magnitude of each ``n``-entry tensor are zeroed (ties broken by position),
   as ReLoRA prunes 99% of them; the state of the other parameters and Adam's step count are
   kept.

The reset is :meth:`ReLoRA.after_update`, which :func:`train.steps.make_train_step` calls after
every update; it is a ``lax.cond`` on the step count inside the jitted step, so the loop stays
generic and a checkpoint written after a reset is an ordinary state (resume is exact).

The learning rate is ReLoRA's jagged schedule (:func:`jagged_schedule`): the run's warm-up and
cosine decay, multiplied after each reset by a linear re-warm-up from 0 over ``rewarm_steps``
steps. ReLoRA's optional full-rank warm start (training the dense model for the first steps) is
not implemented: the adapters train from the first step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import optax

from train import lora as lora_lib


def jagged_schedule(base: optax.Schedule, reset_every: int,
                    rewarm_steps: int) -> optax.Schedule:
  """``base(t)`` times ReLoRA's re-warm-up factor after every reset.

  With ``k = t mod reset_every``, the factor is ``k / rewarm_steps`` for ``t >= reset_every``
  and ``k < rewarm_steps`` (the steps right after a reset, the first one at learning rate 0),
  and 1 otherwise. ``t`` is the number of updates before the one the rate applies to, so the
  update after the reset at step count ``j * reset_every`` is the first of the re-warm-up.

  Examples:
    >>> schedule = jagged_schedule(lambda t: 1.0, reset_every=4, rewarm_steps=2)
    >>> [float(schedule(t)) for t in range(8)]
    [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0]
  """

  def schedule(count):
    count = jnp.asarray(count)
    since = count % reset_every
    jag = (count >= reset_every) & (since < rewarm_steps)
    factor = jnp.where(jag, since / max(rewarm_steps, 1), 1.0)
    return base(count) * factor

  return schedule


def prune_by_magnitude(x: jax.Array, fraction: float) -> jax.Array:
  """``x`` with its ``floor(fraction * x.size)`` smallest-magnitude entries set to zero.

  Examples:
    >>> prune_by_magnitude(jnp.array([3.0, -1.0, 0.5, -4.0]), 0.5).tolist()
    [3.0, 0.0, 0.0, -4.0]
  """
  count = int(math.floor(fraction * x.size))
  if count == 0:
    return x
  order = jnp.argsort(jnp.abs(x).ravel(), stable=True)
  keep = jnp.ones((x.size,), bool).at[order[:count]].set(False)
  return jnp.where(keep.reshape(x.shape), x, jnp.zeros_like(x))


def _prune_adapter_moments(opt_state: Any, fraction: float) -> Any:
  """Prunes every subtree ``{"adapters": ..., ...}`` of ``opt_state`` (the moments of them)."""

  def has_adapters(node: Any) -> bool:
    return isinstance(node, dict) and "adapters" in node

  def visit(node: Any) -> Any:
    if not has_adapters(node):
      return node
    pruned = jax.tree.map(lambda x: prune_by_magnitude(x, fraction), node["adapters"])
    return {**node, "adapters": pruned}

  return jax.tree.map(visit, opt_state, is_leaf=has_adapters)


@dataclasses.dataclass(frozen=True)
class ReLoRA(lora_lib.LoRA):
  """LoRA with periodic merge-and-reinitialise of the adapters; see the module doc.

  Attributes:
    rank: ``r``, as in :class:`train.lora.LoRA`.
    alpha: the LoRA scale numerator.
    others: ``"trained"`` (ReLoRA pretrains the parameters without adapters densely).
    projected: which kernels get adapters (``models.llama.galore_mask`` unless given).
    reset_every: steps between merges (a merge follows update ``reset_every``, ``2 *
      reset_every``, ...).
    prune: the fraction of each adapter moment tensor zeroed at a reset, in ``[0, 1)``.
  """

  others: str = "trained"
  reset_every: int = 200
  prune: float = 0.99

  def __post_init__(self):
    super().__post_init__()
    if not (isinstance(self.reset_every, int) and self.reset_every >= 1):
      raise ValueError(f"`relora_reset_every` must be an integer >= 1, got {self.reset_every}")
    if not (math.isfinite(self.prune) and 0 <= self.prune < 1):
      raise ValueError(f"`relora_prune` must lie in [0, 1), got {self.prune}")

  def fresh_adapters(self, adapters: Any, key: jax.Array) -> dict:
    """New adapters shaped like ``adapters``: ``B = 0``, ``A`` Kaiming-uniform from ``key``."""
    out: dict = {}
    for index, path in enumerate(lora_lib.adapted_paths(adapters)):
      pair = lora_lib.get_path(adapters, path)
      a, b = pair[lora_lib.LORA_A], pair[lora_lib.LORA_B]
      bound = 1.0 / math.sqrt(a.shape[0])
      new_a = jax.random.uniform(jax.random.fold_in(key, index), a.shape, jnp.float32,
                                 -bound, bound).astype(a.dtype)
      lora_lib.set_path(out, path, {lora_lib.LORA_A: new_a, lora_lib.LORA_B: jnp.zeros_like(b)})
    return out

  def reset(self, held: dict, opt_state: Any, key: jax.Array) -> tuple[dict, Any]:
    """Merges the adapters into the base, re-initialises them and prunes their moments."""
    held = {"base": self.merge(held), "adapters": self.fresh_adapters(held["adapters"], key)}
    return held, _prune_adapter_moments(opt_state, self.prune)

  def after_update(self, step: jax.Array, held: dict, opt_state: Any,
                   key: jax.Array) -> tuple[dict, Any]:
    """:meth:`reset` when ``step`` (the count after this update) is a multiple of
    ``reset_every``, else the arguments unchanged; traceable (a ``lax.cond``)."""
    return jax.lax.cond(step % self.reset_every == 0,
                        lambda: self.reset(held, opt_state, key),
                        lambda: (held, opt_state))
