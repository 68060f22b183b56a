"""The pure functions a run jits: the loss, the train step, and the state they carry."""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

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


def masked_cross_entropy(graphdef: Any, params: Any, batch: dict[str, jax.Array]) -> jax.Array:
  """Mean next-token cross-entropy over the targets a loss mask selects (float32).

  Args:
    graphdef: the model's graphdef.
    params: the model parameters.
    batch: ``{"tokens": [B, T + 1], "mask": [B, T]}``; ``mask[b, t]`` (0 or 1) says whether
      the target ``tokens[b, t + 1]`` counts (e.g. only the assistant's tokens of a
      conversation; right padding is masked out). Causal attention keeps real tokens from
      seeing the padding after them, so no attention mask is needed.

  Returns:
    The sum of the selected tokens' losses over their number (0 when none is selected).
  """
  tokens, mask = batch["tokens"], batch["mask"].astype(jnp.float32)
  logits = llama.apply(graphdef, params, tokens[:, :-1])
  losses = optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), tokens[:, 1:])
  return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)


def init_train_params(params: Any, tx: optax.GradientTransformation, parametrization: Any,
                      key: jax.Array) -> tuple[Any, Any]:
  """``(held, opt_state)`` of a run starting from model ``params``.

  Without a parametrisation the held tree is ``params`` and the optimizer state covers it; with
  one (:class:`train.lora.Parametrization`), the held tree is ``parametrization.init(params, key)``
  and the optimizer state covers its trainable part only.
  """
  if parametrization is None:
    return params, tx.init(params)
  held = parametrization.init(params, key)
  return held, tx.init(parametrization.split(held)[0])


def model_params(params: Any, parametrization: Any) -> Any:
  """The model parameters of a held tree (itself without a parametrisation)."""
  return params if parametrization is None else parametrization.merge(params)


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, loss: Callable[[Any, Any, Any], jax.Array] = cross_entropy,
                    parametrization: Any = None):
  """A pure train step ``(state, batch[, lr_scale]) -> (state, metrics)`` to be jitted.

  ``lr_scale`` (a traced scalar) multiplies the updates: with ``tx`` built on a schedule that
  peaks at 1 it is the peak learning rate, so one compilation serves a learning-rate sweep (every
  optimizer here ends in ``scale_by_learning_rate``). The trainer leaves it out.

  Args:
    graphdef: the model's graphdef.
    tx: the optimizer.
    schedule: the learning-rate schedule (for the ``lr`` metric).
    loss: ``loss(graphdef, model_params, batch) -> scalar``; next-token cross-entropy of a
      ``[B, T + 1]`` token batch unless given (:func:`masked_cross_entropy` for fine-tuning).
    parametrization: ``None`` (``state.params`` are the model parameters, all trained) or a
      :class:`train.lora.Parametrization`: the gradient is taken with respect to its trainable
      part only, and the model computes with ``parametrization.merge(state.params)``. If it
      has ``after_update(step, held, opt_state, key)`` (:class:`train.relora.ReLoRA`), that is
      applied to the held tree and optimizer state after each update, with ``step`` the count
      after the update and ``key`` derived from ``state.rng``.
  """

  def train_step(state: TrainState, batch: Any, lr_scale: Optional[jax.Array] = None):
    if parametrization is None:
      loss_value, grads = jax.value_and_grad(loss, argnums=1)(graphdef, state.params, batch)
      trainable, frozen = state.params, None
    else:
      trainable, frozen = parametrization.split(state.params)
      loss_value, grads = jax.value_and_grad(
          lambda t: loss(graphdef, parametrization.merge(parametrization.combine(t, frozen)),
                         batch))(trainable)
    updates, opt_state = tx.update(grads, state.opt_state, trainable)
    if lr_scale is not None:
      updates = jax.tree.map(lambda u: (lr_scale * u).astype(u.dtype), updates)
    params = optax.apply_updates(trainable, updates)
    rng, step_key = jax.random.split(state.rng)
    if parametrization is not None:
      params = parametrization.combine(params, frozen)
      after_update = getattr(parametrization, "after_update", None)
      if after_update is not None:  # e.g. ReLoRA's periodic merge (train.relora)
        params, opt_state = after_update(state.step + 1, params, opt_state,
                                         jax.random.fold_in(step_key, 1))
    metrics = {
        "train_loss": loss_value,
        "grad_norm": optax.tree.norm(grads),
        "update_norm": optax.tree.norm(updates),
        "lr": schedule(state.step),
    }
    return TrainState(state.step + 1, params, opt_state, rng), metrics

  return train_step
