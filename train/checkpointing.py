"""Checkpoints with orbax: async saves, keep-last-N, exact resume.

A checkpoint holds two items: ``state`` (the :class:`TrainState` pytree:
step, parameters, optimizer state, rng) and ``meta`` (JSON: step, data
position, seed, config). Orbax writes each step into a temporary directory and
renames it only once complete, so a crash mid-save leaves the previous
checkpoint as the latest usable one.

Failures are reported as :class:`CheckpointError` with a one-line message:

* a save that fails in the background (a full disk) is noticed by
  :meth:`Checkpointer.check`, which the training loop calls every step, and by
  :meth:`Checkpointer.wait`; the previous checkpoint is kept;
* a damaged checkpoint (a truncated or missing file) is skipped by
  :meth:`Checkpointer.restore_newest`, which restores the newest intact one
  and moves the damaged ones aside as ``<step>.damaged`` so that the resumed
  run can save those steps again.

Orbax logs its own failures with full tracebacks, and a failed read leaves
dozens of abandoned reads that print theirs; while a :class:`Checkpointer` is
open both are dropped, since every failure reaches the caller as an exception.

Orbax refuses zero-size arrays (``optax.contrib.galore`` keeps empty
projectors for unprojected leaves): they are saved as ``None`` and rebuilt
from the restore target's shape, dtype and sharding.
"""

from __future__ import annotations

import gc
import logging
import os
import re
import sys
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

_ORBAX_DIR = os.path.dirname(ocp.__file__)
_MESSAGE_CHARS = 300


class CheckpointError(RuntimeError):
  """A checkpoint could not be saved or restored; the message is one line."""


def _one_line(error: BaseException) -> str:
  """An exception's message on one line (orbax/tensorstore ones run to pages).

  A tensorstore I/O error is reduced to its operating-system reason, e.g. ``No space left on
  device [errno 28]``; orbax's bare ``Exception`` is replaced by its cause (tensorstore's
  message); a long line keeps its start and its end (where tensorstore puts the reason).
  """
  if type(error) is Exception and error.__cause__ is not None:  # pylint: disable=unidiomatic-typecheck
    error = error.__cause__
  code = re.search(r"os_error_code='?(\d+)", str(error))
  if code:
    return f"{os.strerror(int(code.group(1)))} [errno {code.group(1)}]"
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  text = lines[0] if lines else type(error).__name__
  text = re.split(r" \[(?:tensorstore_spec|source locations)", text)[0]  # pages of JSON
  half = _MESSAGE_CHARS // 2
  return text if len(text) <= _MESSAGE_CHARS else f"{text[:half]} ... {text[-half:]}"


def _from_orbax(record: logging.LogRecord) -> bool:
  return record.levelno >= logging.ERROR and record.pathname.startswith(_ORBAX_DIR)


class _DropOrbaxErrors(logging.Filter):
  """Drops orbax's error records (tracebacks of failures the caller gets as exceptions)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not _from_orbax(record)


class _DropAbandonedOrbaxReads(logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for orbax's abandoned read tasks.

  After the first failed read of a damaged checkpoint, orbax leaves its other read tasks behind;
  asyncio logs each one's exception (a page of traceback) whenever the task is garbage-collected,
  which may be long after the restore has failed and its manager closed. So this filter stays on
  the ``asyncio`` logger for the life of the process; it drops only records naming orbax's files.
  """

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR and _ORBAX_DIR in record.getMessage())


logging.getLogger("asyncio").addFilter(_DropAbandonedOrbaxReads())


class _QuietOrbaxReads:
  """A ``sys.unraisablehook`` that drops the leftovers of a failed orbax read, passing on the rest.

  When one array of a damaged checkpoint fails to read, orbax's event loop closes while
  tensorstore still completes the other reads: each completion's callback fails with "Event loop
  is closed", and each abandoned read coroutine with its own error, every one printed as a
  traceback of its own (hundreds of lines). The failure itself reaches the caller as
  :class:`CheckpointError`.
  """

  def __init__(self):
    self.previous = sys.unraisablehook

  def __call__(self, unraisable) -> None:
    error = unraisable.exc_value
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    code = getattr(unraisable.object, "cr_code", None)
    orbax_read = code is not None and code.co_filename.startswith(_ORBAX_DIR)
    if not (closed_loop or orbax_read):
      self.previous(unraisable)


def _drop_empty(tree: Any) -> Any:
  return jax.tree.map(lambda x: None if x.size == 0 else x, tree)


def _refill_empty(abstract: Any, restored: Any) -> Any:
  def fill(a, r):
    if a.size:
      return r
    return jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding) if a.sharding else (
        jnp.zeros(a.shape, a.dtype))
  return jax.tree.map(fill, abstract, restored)


def _is_read_failure(error: Exception) -> bool:
  """Whether ``error`` is how orbax reports unreadable files, not a bug.

  A truncated array file raises a bare ``Exception``, a missing ``_METADATA`` a ``ValueError``
  (tree structure), an empty manifest a tensorstore ``ValueError``, an empty metadata file a
  ``JSONDecodeError`` (a ``ValueError``), a missing file an ``OSError``.
  """
  return isinstance(error, (OSError, ValueError)) or type(error) is Exception  # pylint: disable=unidiomatic-typecheck


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
    self._filter = _DropOrbaxErrors()
    logging.getLogger("absl").addFilter(self._filter)
    self._hook = _QuietOrbaxReads()
    sys.unraisablehook = self._hook
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=async_save,
    )
    try:
      self._manager = ocp.CheckpointManager(
          self.directory, options=options, item_names=("state", "meta"))
    except OSError as e:
      self._release_hooks()
      raise CheckpointError(f"cannot open checkpoint directory {self.directory}: "
                            f"{_one_line(e)}") from e
    self._pending: Optional[int] = None  # the step of a save not yet known to have succeeded

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

    Raises:
      CheckpointError: this save, or an earlier one still in flight, failed.
    """
    if step in self._manager.all_steps():
      return
    if self._pending is not None:
      self.wait()  # orbax would wait for it anyway; this reports its failure under its own step
    try:
      self._manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(_drop_empty(state)), meta=ocp.args.JsonSave(meta)),
          force=True)
    except Exception as e:  # pylint: disable=broad-except  (orbax/tensorstore raise many types)
      self._pending = None
      raise self._save_error(step, e) from e
    self._pending = step
    if not self._manager.is_saving_in_progress():  # saved synchronously
      self.check()

  def _save_error(self, step: int, error: BaseException) -> CheckpointError:
    self._manager.reload()  # forget the failed step; the files left are a temporary directory
    newest = self._manager.latest_step()
    kept = (f"the newest intact checkpoint is step {newest}; rerun to resume from it"
            if newest is not None else "there is no earlier checkpoint")
    return CheckpointError(f"saving checkpoint {step} in {self.directory} failed: "
                           f"{_one_line(error)}; {kept}")

  def check(self) -> None:
    """Raises if a finished background save failed; returns at once while one is running.

    Raises:
      CheckpointError: naming the step that could not be saved and the newest intact one.
    """
    if self._pending is None or self._manager.is_saving_in_progress():
      return
    self.wait()

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
    """Restores a checkpoint into the structure and shardings of ``abstract_state``.

    Args:
      step: which checkpoint.
      abstract_state: a pytree of ``jax.ShapeDtypeStruct`` with ``.sharding``.

    Returns:
      ``(state, meta)``.

    Raises:
      CheckpointError: the checkpoint is damaged or does not match ``abstract_state``.
    """
    try:
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(_drop_empty(abstract_state)),
              meta=ocp.args.JsonRestore()))
      state = jax.block_until_ready(_refill_empty(abstract_state, restored.state))
    except Exception as e:  # pylint: disable=broad-except  (orbax raises a bare Exception)
      if not _is_read_failure(e):
        raise
      gc.collect()  # orbax's abandoned read coroutines, while the unraisable hook is installed
      raise CheckpointError(f"checkpoint {step} in {self.directory}: {_one_line(e)}") from e
    return state, restored.meta

  def restore_meta(self, step: int) -> dict[str, Any]:
    """Restores only the JSON metadata of a checkpoint (cheap; no arrays).

    Raises:
      CheckpointError: the metadata is missing or not JSON.
    """
    try:
      meta = self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
    except Exception as e:  # pylint: disable=broad-except  (orbax raises a bare Exception)
      if not _is_read_failure(e):
        raise
      raise CheckpointError(f"checkpoint {step} in {self.directory}: {_one_line(e)}") from e
    if not isinstance(meta, dict):
      raise CheckpointError(f"checkpoint {step} in {self.directory}: its metadata is not an"
                            " object")
    return meta

  def restore_newest(self, abstract_state: Any, *,
                     check: Optional[Callable[[dict[str, Any]], None]] = None
                     ) -> tuple[Optional[int], Any, Optional[dict[str, Any]]]:
    """Restores the newest intact checkpoint, skipping damaged ones with a warning.

    Checkpoints newer than the one restored are damaged (an older one restored into the same
    structure); they are renamed ``<step>.damaged`` so that the resumed run saves those steps
    afresh and keeps them out of the rotation.

    Args:
      abstract_state: as for :meth:`restore`.
      check: called with each candidate's metadata before its arrays are read; an exception it
        raises (e.g. a configuration that cannot resume) propagates.

    Returns:
      ``(step, state, meta)``, or ``(None, None, None)`` when there is no checkpoint.

    Raises:
      CheckpointError: there are checkpoints but none can be restored.
    """
    damaged: list[tuple[int, CheckpointError]] = []
    for step in reversed(self.all_steps()):
      try:
        meta = self.restore_meta(step)
        if check is not None:
          check(meta)
        state, meta = self.restore(step, abstract_state)
      except CheckpointError as e:
        logging.getLogger(__name__).warning(
            "%s; skipping it (damaged) and trying an older checkpoint", e)
        damaged.append((step, e))
        continue
      for bad, _ in damaged:
        self._set_aside(bad)
      return step, state, meta
    if damaged:
      step, error = damaged[0]
      raise CheckpointError(f"no checkpoint in {self.directory} can be restored (newest: {error});"
                            " move the directory away to start afresh")
    return None, None, None

  def _set_aside(self, step: int) -> None:
    """Renames a damaged step directory to ``<step>.damaged`` (``.damaged.N`` if taken)."""
    source = os.path.join(self.directory, str(step))
    target, n = f"{source}.damaged", 1
    while os.path.exists(target):
      target, n = f"{source}.damaged.{n}", n + 1
    if jax.process_index() == 0:
      os.rename(source, target)
    logging.getLogger(__name__).warning("moved damaged checkpoint %d to %s", step, target)
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending async saves are on disk.

    Raises:
      CheckpointError: a save failed (see :meth:`check`).
    """
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except  (whatever the background save raised)
      if step is None:
        return  # orbax raises a failure again on every wait; it was reported the first time
      raise self._save_error(step, e) from e

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads.

    Raises:
      CheckpointError: a pending save failed.
    """
    try:
      self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        pass  # a failed save, raised again by orbax's close; wait() reported it
      self._release_hooks()

  def _release_hooks(self) -> None:
    logging.getLogger("absl").removeFilter(self._filter)
    if sys.unraisablehook is self._hook:
      sys.unraisablehook = self._hook.previous
