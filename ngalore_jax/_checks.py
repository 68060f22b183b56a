"""Argument validation shared by the transformations: fail at construction, naming the argument."""

from typing import Any, Sequence

import jax
import numpy as np


def _is_concrete_number(value: Any) -> bool:
  # Under optax.inject_hyperparams a hyperparameter may arrive as a traced array; it cannot be
  # compared in Python, and it was already checked when the user first passed it.
  if isinstance(value, (bool, np.bool_)):
    return False
  if isinstance(value, (int, float, np.number)):
    return True
  return (isinstance(value, (np.ndarray, jax.Array)) and value.shape == ()
          and not isinstance(value, jax.core.Tracer))


def check_positive_int(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is an integer >= 1."""
  if isinstance(value, bool) or not isinstance(value, int):
    raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
  if value < 1:
    raise ValueError(f"`{name}` must be an integer >= 1, got {value}.")


def check_positive(name: str, value: Any) -> None:
  """Raises ``ValueError`` unless ``value`` is finite and > 0 (skipped for traced values).

  NaN and infinity fail too: ``float("nan") > 0`` is ``False``, and an infinite damping or
  scale silently gives zero or non-finite updates.
  """
  if _is_concrete_number(value) and not 0 < float(value) < float("inf"):
    raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")


def check_range(name: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` is finite and lies in the stated interval.

  NaN fails (every comparison with NaN is ``False``, so a plain bounds test lets it through),
  and so does infinity, whatever the bounds. Skipped for traced values.
  """
  if not _is_concrete_number(value):
    return
  v = float(value)
  check_finite(name, v)
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above:
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    raise ValueError(f"`{name}` must be in {left}{low}, {high}{right}, got {value}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")


def check_finite(name: str, value: Any) -> None:
  """Raises ``ValueError`` if ``value`` is NaN or infinite (skipped for traced values)."""
  if _is_concrete_number(value) and not np.isfinite(float(value)):
    raise ValueError(f"`{name}` must be a finite number, got {value}.")


def check_float_dtype(name: str, dtype: Any) -> None:
  """Raises ``ValueError`` unless ``dtype`` names a floating-point dtype (bfloat16 included).

  An integer or boolean dtype for stored optimizer state (a history, a projector) would
  truncate every value written to it, and the updates would silently be zero.
  """
  try:
    resolved = np.dtype(dtype)
  except TypeError as error:
    raise ValueError(f"`{name}` must be a floating-point dtype, got {dtype!r}.") from error
  if not jax.numpy.issubdtype(resolved, jax.numpy.floating):  # bfloat16 included
    raise ValueError(f"`{name}` must be a floating-point dtype, got {resolved}.")
