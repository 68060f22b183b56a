"""Metrics: JSON lines plus TensorBoard, and throughput the way practitioners read it.

``WORKDIR/metrics.jsonl`` holds one object per logged step (``step``,
``train_loss``, ``lr``, ``tokens_per_sec``, ...); evaluation lines add
``eval_loss`` and ``eval_perplexity``. TensorBoard event files go to
``WORKDIR/tensorboard``.
"""

from __future__ import annotations

import json
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
    if not os.path.exists(self.path):
      return
    with open(self.path, encoding="utf-8") as f:
      lines = [line for line in f if line.strip()]
    keep = [line for line in lines if json.loads(line).get("step", 0) <= step]
    if len(keep) != len(lines):
      with open(self.path, "w", encoding="utf-8") as f:
        f.writelines(keep)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Writes one line ``{"step": step, **metrics}`` and the scalars to TensorBoard."""
    if not self.enabled:
      return
    record = {"step": int(step)}
    record.update({k: _plain(v) for k, v in metrics.items()})
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)

  def close(self) -> None:
    if self.enabled:
      self._file.close()
      self._tb.close()


def _plain(value: Any) -> Any:
  """Python scalars for JSON (numpy/jax scalars converted)."""
  if hasattr(value, "item"):
    value = value.item()
  return value


def read_metrics(path: str) -> list[dict[str, Any]]:
  """Reads a ``metrics.jsonl`` file into a list of dicts."""
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]
