"""Argument validation shared by the transformations: fail at construction, naming the argument."""

from typing import Any, Sequence

import jax
import numpy as np


def _is_concrete_number(value: Any) -> bool:
  # Under optax.inject_hyperparams a hyperparameter may arrive as a traced array; it cannot be
  # compared in Python, and it was already checked when the user first passed it.
  if isinstance(value, bool):
    return False
  if isinstance(value, (int, float)):
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
  """Raises ``ValueError`` unless ``value`` is > 0 (skipped for traced values)."""
  if _is_concrete_number(value) and not float(value) > 0:
    raise ValueError(f"`{name}` must be > 0, got {value}.")


def check_range(name: str, value: Any, low: float, high: float, *,
                low_open: bool = False, high_open: bool = False) -> None:
  """Raises ``ValueError`` unless ``value`` lies in the stated interval."""
  if not _is_concrete_number(value):
    return
  v = float(value)
  below = v <= low if low_open else v < low
  above = v >= high if high_open else v > high
  if below or above:
    left, right = ("(" if low_open else "["), (")" if high_open else "]")
    raise ValueError(f"`{name}` must be in {left}{low}, {high}{right}, got {value}.")


def check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
  """Raises ``ValueError`` unless ``value`` is one of ``choices``."""
  if value not in choices:
    raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
