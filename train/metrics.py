"""Metrics: JSON lines plus TensorBoard, and throughput the way practitioners read it.

``WORKDIR/metrics.jsonl`` holds one object per logged step (``step``,
``train_loss``, ``lr``, ``tokens_per_sec``, ...); evaluation lines add
``eval_loss`` and ``eval_perplexity``. TensorBoard event files go to
``WORKDIR/tensorboard``.

The file is strict JSON lines: a value that is not finite (a diverged loss) is
written as ``null``, never as a bare ``NaN`` or ``Infinity``. A line that does
not parse (the torn last line of a process killed mid-write) is dropped with a
warning by :func:`read_metrics`, and from the file itself when a run resumes.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Optional

# Dense bf16 peak FLOP/s per chip, for MFU (matched against device_kind).
PEAK_FLOPS = (
    ("H200", 989e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("TPU v5p", 459e12),
    ("TPU v5 lite", 197e12),
    ("TPU v4", 275e12),
)


def peak_flops_per_device(device_kind: str) -> Optional[float]:
  """Peak FLOP/s of a known accelerator, or ``None`` (e.g. on CPU).

  Examples:
    >>> peak_flops_per_device("NVIDIA H100 80GB HBM3")
    989000000000000.0
    >>> peak_flops_per_device("cpu") is None
    True
  """
  for name, flops in PEAK_FLOPS:
    if name.lower() in device_kind.lower():
      return flops
  return None


def throughput(tokens: int, seconds: float, *, flops_per_token: float,
               peak_flops: Optional[float] = None) -> dict[str, float]:
  """Tokens/s, achieved TFLOP/s and (when the peak is known) MFU.

  Args:
    tokens: tokens processed in the interval.
    seconds: wall time of the interval.
    flops_per_token: training FLOPs per token (forward and backward).
    peak_flops: peak FLOP/s of all devices together, or ``None``.

  Returns:
    ``tokens_per_sec``, ``tflops`` and, when ``peak_flops`` is given, ``mfu``.

  Examples:
    >>> throughput(1000, 2.0, flops_per_token=6e9, peak_flops=1e13)
    {'tokens_per_sec': 500.0, 'tflops': 3.0, 'mfu': 0.3}
  """
  seconds = max(seconds, 1e-9)
  tokens_per_sec = tokens / seconds
  flops = tokens_per_sec * flops_per_token
  out = {"tokens_per_sec": tokens_per_sec, "tflops": flops / 1e12}
  if peak_flops:
    out["mfu"] = flops / peak_flops
  return out


def perplexity(loss: float) -> float:
  """``exp(loss)``, capped so a diverged run logs a number rather than overflow."""
  return math.exp(min(loss, 80.0))


class MetricsWriter:
  """Appends metrics to ``metrics.jsonl`` and TensorBoard.

  Args:
    workdir: the run directory.
    resume_step: when resuming, lines logged after this step (by a run that
      died before its next checkpoint) are dropped so the file reads as one run.
    enabled: ``False`` on non-zero processes of a multi-process run.
  """

  def __init__(self, workdir: str, *, resume_step: int = 0, enabled: bool = True):
    self.path = os.path.join(workdir, "metrics.jsonl")
    self.tensorboard_dir = os.path.join(workdir, "tensorboard")
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._truncate_after(resume_step)
    self._file = open(self.path, "a", encoding="utf-8")
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    self._tb = SummaryWriter(self.tensorboard_dir, purge_step=resume_step + 1)

  def _truncate_after(self, step: int) -> None:
    """Drops the lines after ``step`` and any line that does not parse (rewriting the file)."""
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = f.readlines()
    keep = []
    for line, record in _parse_lines(self.path, lines):
      if record is not None and record.get("step", 0) <= step:
        keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(keep)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one line ``{"step": step, **metrics}`` and the scalars to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record, allow_nan=False) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(value: Any) -> Any:
  """Python scalars for strict JSON (numpy/jax scalars converted, NaN and infinities as None)."""
  if hasattr(value, "item"):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def _parse_lines(path: str, lines: list[str]) -> list[tuple[str, Optional[dict[str, Any]]]]:
  """Pairs each non-blank line with its object, or ``None`` (with a warning) if it is not one."""
  out = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      record = None
    if not isinstance(record, dict):
      logging.getLogger(__name__).warning(
          "%s:%d is not a JSON object (a line torn by a crash?); dropping it: %.60r",
          path, number, line.rstrip("\n"))
      record = None
    out.append((line, record))
  return out


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file into a list of dicts.

  Lines that do not parse as JSON objects are skipped with a warning.
  """
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  return [record for _, record in _parse_lines(str(path), lines) if record is not None]
