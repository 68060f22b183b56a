"""Per-layer optimizer updates: each layer's update is applied as soon as its gradient exists.

A plain train step (``value_and_grad``, then ``tx.update``, then ``apply_updates``) needs the
whole gradient before the optimizer runs, so at its peak a full-size gradient (for LLaMA-7B in
bfloat16, 12.6 GiB) is alive next to the weights and the optimizer state. GaLore's per-layer
weight updates avoid that: the backward pass walks the layers from the last to the first and
updates each one with its own gradient, which then dies before the next layer's gradient is
computed. The peak holds one layer's gradient instead of all of them.

:func:`make_train_step` writes that backward pass out for :class:`models.llama.Llama`:

* the forward pass keeps only each block's input (the residual stream; activation checkpointing
  per block), then the head (final norm, output projection, cross-entropy) is differentiated;
* for each block, last to first, its forward is recomputed under ``jax.vjp``, the pullback gives
  the block's parameter gradient and the gradient of its input, and the optimizer updates the
  block's parameters and state right there;
* ``jax.lax.optimization_barrier`` ties the updated block to the input gradient handed to the
  next block, so XLA cannot postpone an update (and keep its gradient alive) past the next
  layer's backward; XLA's own scheduling of one jitted step is not relied on.

The optimizer state is one ``tx.init`` per part (:func:`init`): the embedding, each block, and
the head; each part is a sub-dict of the parameters with the same key paths (``{"blocks": {3:
...}}``), so path-based masks such as :func:`models.llama.galore_mask` select the same leaves.
For per-leaf transformations (Adam, 8-bit Adam, ``ng.galore``, ``ng.natural_galore`` with their
default, unstaggered refreshes) the result equals the whole-tree update. Whatever couples leaves
across parts differs: ``stagger_refresh`` and the randomized SVD's keys depend on a leaf's index
in the tree it is given.

Clipping (``clip``):

* ``None``: no clipping; one backward pass.
* ``"layer"``: each part's gradient is clipped by its own norm to ``clip_norm``
  (``optax.clip_by_global_norm`` applied to each part); one backward pass.
* ``"global"``: the usual clip by the norm of the whole gradient, which is only known once the
  whole backward is done. A first backward pass only sums the squared norms (each layer's
  gradient dies at once), a second one applies the clipped updates: one extra backward pass,
  no full-size gradient.

With tied embeddings the output projection's gradient of the embedding is kept until the
embedding's own gradient arrives (one embedding-sized buffer), and the embedding is updated last.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from train import steps

CLIP_MODES = (None, "layer", "global")


def split_parts(params: dict[str, Any]) -> dict[str, Any]:
  """The parts the optimizer updates one at a time, each a sub-dict of ``params``.

  Args:
    params: LLaMA parameters (:func:`models.llama.split_params`).

  Returns:
    ``{"embed": {"embed": ...}, "blocks": ({"blocks": {0: ...}}, ...), "head": {...}}``; the head
    holds ``final_norm`` and ``lm_head`` (``final_norm`` only with tied embeddings). Key paths
    are those of ``params``.
  """
  blocks = params["blocks"]
  return {
      "embed": {"embed": params["embed"]},
      "blocks": tuple({"blocks": {i: blocks[i]}} for i in sorted(blocks)),
      "head": {k: params[k] for k in ("final_norm", "lm_head") if k in params},
  }


def merge_parts(parts: dict[str, Any]) -> dict[str, Any]:
  """Inverse of :func:`split_parts`."""
  params = {**parts["embed"], **parts["head"]}
  params["blocks"] = {}
  for block in parts["blocks"]:
    params["blocks"].update(block["blocks"])
  return params


def init(tx: optax.GradientTransformation, params: dict[str, Any]) -> dict[str, Any]:
  """The optimizer state of :func:`make_train_step`: ``tx.init`` of each part.

  Args:
    tx: the optimizer (no gradient clipping in it: :func:`make_train_step` clips).
    params: LLaMA parameters.

  Returns:
    ``{"embed": state, "blocks": (state, ...), "head": state}``.
  """
  parts = split_parts(params)
  return {"embed": tx.init(parts["embed"]), "blocks": tuple(map(tx.init, parts["blocks"])),
          "head": tx.init(parts["head"])}


def _sum_squares(tree: Any) -> jax.Array:
  return sum((jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)),
             jnp.zeros((), jnp.float32))


def _after(tree: Any, token: jax.Array) -> Any:
  """``tree``'s values, as new arrays that XLA computes only once ``token`` exists.

  Adds ``0 * token[0]`` (exactly zero unless ``token`` holds a NaN or an infinity; XLA does not
  fold a float ``x * 0``). A block's forward and its backward each use weights made this way
  from the block's input and from its output gradient: what XLA derives from them (on CPU,
  float32 copies of bfloat16 weights for its matmuls) can neither be shared between the two
  (CSE) nor computed early (XLA:CPU otherwise converts all weights up front), so it lives for
  one block only. An ``optimization_barrier`` does not do this: XLA removes it before its late
  CSE passes. The cost is a transient copy of one block's weights.
  """
  zero = jax.lax.index_in_dim(token.reshape(-1), 0, keepdims=False) * 0
  return jax.tree.map(lambda w: w + zero.astype(w.dtype), tree)


def _modules(graphdef: Any, params: dict[str, Any]):
  """Pure functions of the model's pieces: ``embed(p, tokens)``, ``block(p, x, positions)``,
  ``head(p, x)`` (float32 logits; ``p`` holds ``embed`` too when tied)."""
  model = nnx.merge(graphdef, params)
  embed_def = nnx.split(model.embed, nnx.Param)[0]
  block_def = nnx.split(model.blocks[0], nnx.Param)[0]
  norm_def = nnx.split(model.final_norm, nnx.Param)[0]
  tied = model.lm_head is None
  head_def = None if tied else nnx.split(model.lm_head, nnx.Param)[0]

  def embed(p, tokens):
    return nnx.merge(embed_def, p["embed"])(tokens)

  def block(p, x, positions):
    return nnx.merge(block_def, p)(x, positions)

  def head(p, x):
    x = nnx.merge(norm_def, p["final_norm"])(x)
    if tied:
      return nnx.merge(embed_def, p["embed"]).attend(x)
    return nnx.merge(head_def, p["lm_head"])(x).astype(jnp.float32)

  return model.config, embed, block, head, tied


def make_train_step(graphdef: Any, tx: optax.GradientTransformation, schedule: optax.Schedule,
                    *, clip: Optional[str] = None, clip_norm: float = 1.0) -> Callable:
  """A train step ``(state, batch) -> (state, metrics)`` that updates layer by layer.

  Same signature and metrics as :func:`train.steps.make_train_step` (next-token cross-entropy
  of a ``[B, T + 1]`` token batch), with ``state.opt_state`` from :func:`init`.

  Args:
    graphdef: the LLaMA graphdef.
    tx: the optimizer, without clipping; applied to each part separately.
    schedule: the learning-rate schedule (for the ``lr`` metric).
    clip: ``None``, ``"layer"`` (each part clipped by its own norm) or ``"global"`` (the whole
      gradient's norm, at the cost of a second backward pass); see the module doc.
    clip_norm: the norm clipped to.

  Returns:
    The step function, to be jitted (donate the state).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> from models import llama
    >>> from train import per_layer, steps
    >>> cfg = llama.LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=24,
    ...                         num_layers=2, num_heads=2)
    >>> graphdef, params = llama.init_params(cfg)
    >>> tx = optax.adam(1e-2)
    >>> state = steps.TrainState(jnp.zeros((), jnp.int32), params, per_layer.init(tx, params),
    ...                          jax.random.PRNGKey(0))
    >>> step = jax.jit(per_layer.make_train_step(graphdef, tx, optax.constant_schedule(1e-2)))
    >>> state, metrics = step(state, jnp.ones((2, 9), jnp.int32))
    >>> int(state.step), bool(jnp.isfinite(metrics["train_loss"]))
    (1, True)
  """
  if clip not in CLIP_MODES:
    raise ValueError(f"clip must be one of {CLIP_MODES}, got {clip!r}")

  def train_step(state: steps.TrainState, batch: jax.Array):
    config, embed, block, head, tied = _modules(graphdef, state.params)
    tokens, targets = batch[:, :-1], batch[:, 1:]
    bsz, seq = tokens.shape
    if seq > config.max_position_embeddings:
      raise ValueError(f"sequence length {seq} exceeds max_position_embeddings="
                       f"{config.max_position_embeddings}")
    positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (bsz, seq))
    parts = split_parts(state.params)
    opt = state.opt_state

    # Forward: only each block's input is kept; blocks are recomputed in the backward.
    inputs = []
    x = embed(parts["embed"], tokens)
    for p in parts["blocks"]:
      inputs.append(x)
      x = block(_after(p, x), x, positions)
    final = x

    def head_loss(p, embed_p, x):
      logits = head({**p, **embed_p} if tied else p, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    def backward(visit):
      """One backward pass; ``visit(name, index, grads) -> out`` sees each part's gradient
      as soon as it exists, last layer first. Returns the loss and the outputs by part."""
      embed_in = parts["embed"] if tied else {}
      loss, pullback = jax.vjp(head_loss, _after(parts["head"], final), _after(embed_in, final),
                               final)
      g_head, g_tied, g_x = pullback(jnp.ones((), loss.dtype))
      out_head = visit("head", None, g_head)
      out_head, g_x = jax.lax.optimization_barrier((out_head, g_x))
      out_blocks = [None] * len(parts["blocks"])
      for i in reversed(range(len(parts["blocks"]))):
        block_params = _after(parts["blocks"][i], g_x)
        _, pullback = jax.vjp(jax.checkpoint(lambda p, x: block(p, x, positions)),
                              block_params, inputs[i])
        g_block, g_x = pullback(g_x)
        out_blocks[i] = visit("blocks", i, g_block)
        # Block i's update is done before block i-1's backward starts: its gradient dies here.
        out_blocks[i], g_x = jax.lax.optimization_barrier((out_blocks[i], g_x))
      _, pullback = jax.vjp(embed, parts["embed"], tokens)
      g_embed = pullback(g_x)[0]
      if tied:
        g_embed = jax.tree.map(jnp.add, g_embed, g_tied)
      out_embed = visit("embed", None, g_embed)
      return loss, {"embed": out_embed, "blocks": tuple(out_blocks), "head": out_head}

    scale = None
    if clip == "global":
      _, squares = backward(lambda name, i, g: _sum_squares(g))
      norm = jnp.sqrt(sum(jax.tree.leaves(squares)))
      scale = jnp.minimum(1.0, clip_norm / jnp.maximum(norm, 1e-30))

    def update(name, i, grads):
      part = parts[name] if i is None else parts[name][i]
      part_state = opt[name] if i is None else opt[name][i]
      squares = _sum_squares(grads)
      if clip == "layer":
        factor = jnp.minimum(1.0, clip_norm / jnp.maximum(jnp.sqrt(squares), 1e-30))
      else:
        factor = scale
      if factor is not None:
        grads = jax.tree.map(lambda g: (g * factor).astype(g.dtype), grads)
      updates, new_state = tx.update(grads, part_state, part)
      return optax.apply_updates(part, updates), new_state, squares, _sum_squares(updates)

    loss, out = backward(update)
    def pick(k):  # the k-th output of ``update`` of every part, in the parts' layout
      return {"embed": out["embed"][k], "blocks": tuple(o[k] for o in out["blocks"]),
              "head": out["head"][k]}

    params = merge_parts(pick(0))
    metrics = {
        "train_loss": loss,
        "grad_norm": jnp.sqrt(sum(jax.tree.leaves(pick(2)))),
        "update_norm": jnp.sqrt(sum(jax.tree.leaves(pick(3)))),
        "lr": schedule(state.step),
    }
    rng, _ = jax.random.split(state.rng)
    return steps.TrainState(state.step + 1, params, pick(1), rng), metrics

  return train_step
