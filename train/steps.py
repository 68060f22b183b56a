"""The pure functions a run jits: the loss, the train step, and the state they carry."""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from models import llama


class TrainState(NamedTuple):
  """Everything a checkpoint holds besides metadata.

  Attributes:
    step: number of optimizer updates applied (int32 scalar); also the data
      position, since batch ``i`` is ``dataset.batch(i, ...)``.
    params: the model parameters (nested dict of arrays).
    opt_state: the optax state.
    rng: a PRNG key advanced once per step, reserved for stochastic layers
      (e.g. dropout), so a resumed run continues the same random stream.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array


def cross_entropy(graphdef: Any, params: Any, batch: jax.Array) -> jax.Array:
  """Mean next-token cross-entropy of ``batch`` ``[B, T + 1]`` (float32)."""
  logits = llama.apply(graphdef, params, batch[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), batch[:, 1:])
  return losses.mean()


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule):
  """A pure train step ``(state, batch[, lr_scale]) -> (state, metrics)`` to be jitted.

  ``lr_scale`` (a traced scalar) multiplies the updates: with ``tx`` built on a schedule that
  peaks at 1 it is the peak learning rate, so one compilation serves a learning-rate sweep (every
  optimizer here ends in ``scale_by_learning_rate``). The trainer leaves it out.
  """

  def train_step(state: TrainState, batch: jax.Array, lr_scale: Optional[jax.Array] = None):
    loss, grads = jax.value_and_grad(cross_entropy, argnums=1)(graphdef, state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if lr_scale is not None:
      updates = jax.tree.map(lambda u: (lr_scale * u).astype(u.dtype), updates)
    params = optax.apply_updates(state.params, updates)
    rng, _ = jax.random.split(state.rng)
    metrics = {
        "train_loss": loss,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "lr": schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step
