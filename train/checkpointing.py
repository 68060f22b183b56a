"""Checkpoints with orbax: async saves, keep-last-N, exact resume.

A checkpoint holds two items: ``state`` (the :class:`TrainState` pytree:
step, parameters, optimizer state, rng) and ``meta`` (JSON: step, data
position, seed, config). Orbax writes each step into a temporary directory and
renames it only once complete, so a crash mid-save leaves the previous
checkpoint as the latest usable one.

Orbax refuses zero-size arrays (``optax.contrib.galore`` keeps empty
projectors for unprojected leaves): they are saved as ``None`` and rebuilt
from the restore target's shape, dtype and sharding.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp


def _drop_empty(tree: Any) -> Any:
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _refill_empty(abstract: Any, restored: Any) -> Any:
  def fill(a, r):
    if a.size:
      return r
    return jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding) if a.sharding else (
        jnp.zeros(a.shape, a.dtype))
  return jax.tree.map(fill, abstract, restored)


class Checkpointer:
  """Saves and restores the training state under ``WORKDIR/checkpoints``.

  Args:
    directory: where the step directories go (created if missing).
    keep: how many of the most recent checkpoints to keep.
    async_save: save in a background thread (the device-to-host copy happens
      before :meth:`save` returns, so donated buffers may be reused at once).
  """

  def __init__(self, directory: str, *, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=("state", "meta"))

  def latest_step(self) -> Optional[int]:
    """The step of the newest complete checkpoint, or ``None``."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
    """Starts an (async) save of ``state`` and ``meta`` as ``step``.

    Args:
      step: the number of optimizer updates applied to ``state``.
      state: a pytree of arrays.
      meta: JSON-serialisable metadata (data position, config, ...).
    """
    if step in self._manager.all_steps():
      return
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)),
        force=True)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure and shardings of ``abstract_state``.

    Args:
      step: which checkpoint.
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``.

    Returns:
      ``(state, meta)``.
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(_drop_empty(abstract_state)),
            meta=ocp.args.JsonRestore()))
    return _refill_empty(abstract_state, restored.state), restored.meta

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Restores only the JSON metadata of a checkpoint (cheap; no arrays)."""
    return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
