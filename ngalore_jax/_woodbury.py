"""Natural-gradient preconditioning with the empirical Fisher of a short gradient history."""

from typing import Any, NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import optax

from ngalore_jax import _checks
from ngalore_jax import _sharding
from ngalore_jax import _tree

DAMPING_MODES = ("absolute", "relative")


class WoodburyState(NamedTuple):
  """State of :func:`woodbury_precondition`.

  Attributes:
    count: Number of gradients seen so far. The next gradient is written at position
      ``count % history_size`` of the ring buffer.
    history: Per leaf, the last ``history_size`` gradients stacked on a new leading axis,
      shape ``(history_size, *leaf.shape)``. Slots not yet written hold zeros, which leave the
      Fisher estimate unchanged.
  """
  count: chex.Array
  history: optax.Updates


def woodbury_precondition(
    history_size: int = 10,
    damping: float = 1e-3,
    *,
    exponent: float = -1.0,
    damping_mode: str = "absolute",
    solver: str = "auto",
    history_dtype: Optional[Any] = None,
) -> optax.GradientTransformation:
  r"""Preconditions each leaf with the inverse empirical Fisher of its recent gradients.

  Natural GaLore's natural-gradient step (Das 2024, eqs. 10-12 and Algorithm 3). Per leaf, the
  gradient ``g`` (flattened to ``k`` entries) is appended to a FIFO history
  :math:`H = [g_{t-s+1}, \dots, g_t] \in \mathbb{R}^{k \times s}` (the current gradient
  included) and replaced by

  .. math::
    \tilde g = (\lambda I_k + H H^\top)^{p}\, g, \qquad p = \text{exponent}.

  With :math:`p = -1` this is the paper's Woodbury step. The :math:`k \times k` matrix is never
  formed: since ``g`` is the last column of ``H``, the push-through identity
  :math:`f(H H^\top) H = H f(H^\top H)` gives :math:`\tilde g = H (\lambda I_s + H^\top H)^{p}
  e_t`, an :math:`s \times s` problem and one :math:`k \times s` product. Unlike eq. 12 as
  printed, :math:`(g - H z)/\lambda`, this form does not cancel catastrophically when
  :math:`\lambda \ll \|g\|^2`. The history is rescaled by its largest entry first, so the
  Gram matrix can neither overflow nor underflow.

  The default solver diagonalises the :math:`s \times s` Gram matrix :math:`H^\top H`.
  Directions whose eigenvalue is below float32 resolution (``s * eps * max``) are null
  directions of ``H`` and are dropped: they contribute exactly nothing in exact arithmetic, and
  keeping them would multiply rounding noise by ``1 / damping`` when the history is
  rank-deficient (repeated, collinear or zero gradients). ``solver="cholesky"`` is the paper's
  Cholesky solve of :math:`\lambda I_s + H^\top H`, with the damping floored at
  ``s * eps * trace(H^T H)`` so that it always factorises; it is as accurate on well-conditioned
  histories and loses accuracy (never finiteness) on rank-deficient ones.

  ``p = -1/2`` gives the GGT-style full-matrix square-root preconditioner from the same history.
  The solve always runs in float32; the update has the gradient's dtype.

  Args:
    history_size: Number ``s`` of recent gradients kept per leaf (>= 1). Memory: ``s`` times the
      leaf's size in ``history_dtype``.
    damping: :math:`\lambda > 0`. Absolute, or relative to the largest eigenvalue of
      :math:`H^\top H` when ``damping_mode="relative"``.
    exponent: Power ``p`` of the damped Fisher, in ``[-1, 0)``. ``-1`` is the paper's natural
      gradient.
    damping_mode: ``"absolute"`` (the paper) or ``"relative"`` (scale-invariant).
    solver: ``"eigh"`` (default; ``"auto"`` is the same) or ``"cholesky"`` (the paper's solve,
      ``exponent=-1`` only).
    history_dtype: dtype of the stored history (e.g. ``jnp.bfloat16`` halves its memory).
      ``None`` keeps each gradient's dtype.

  Returns:
    An ``optax.GradientTransformation``.

  Examples:
    >>> import jax.numpy as jnp
    >>> import optax
    >>> import ngalore_jax as ng
    >>> tx = ng.woodbury_precondition(history_size=4, damping=1e-3)
    >>> params = {"w": jnp.ones((3, 2))}
    >>> state = tx.init(params)
    >>> grads = {"w": jnp.full((3, 2), 2.0)}
    >>> updates, state = tx.update(grads, state)
    >>> # One gradient in the history: (lam I + g g^T)^{-1} g = g / (lam + |g|^2).
    >>> print(jnp.round(updates["w"][0, 0], 5))
    0.08333

  References:
    Das, `Natural GaLore: Accelerating GaLore for memory-efficient LLM training and fine-tuning
    <https://arxiv.org/abs/2410.16029>`_, 2024.
  """
  _checks.check_positive_int("history_size", history_size)
  _checks.check_positive("damping", damping)
  _checks.check_range("exponent", exponent, -1.0, 0.0, high_open=True)
  _checks.check_choice("damping_mode", damping_mode, DAMPING_MODES)
  _checks.check_choice("solver", solver, ("auto", "cholesky", "eigh"))
  if solver == "cholesky" and exponent != -1.0:
    raise ValueError(f"`solver`='cholesky' needs `exponent`=-1, got exponent={exponent}; "
                     "use solver='eigh' or 'auto'.")
  use_cholesky = solver == "cholesky"

  def init_fn(params):
    def init_leaf(p):
      dtype = p.dtype if history_dtype is None else history_dtype
      sharding = _sharding.explicit_sharding(p)
      axes = None if sharding is None else [()] + _sharding.spec_axes(sharding.spec, p.ndim)
      return _sharding.zeros((history_size,) + p.shape, dtype, like=p, axes_per_dim=axes)
    return WoodburyState(count=jnp.zeros([], jnp.int32),
                         history=jax.tree.map(init_leaf, params))

  def update_fn(updates, state, params=None):
    del params
    position = state.count % history_size

    def precondition_leaf(g, history):
      history = history.at[position].set(g.astype(history.dtype))
      direction = natural_direction(history, position, damping, exponent=exponent,
                                    damping_mode=damping_mode, use_cholesky=use_cholesky)
      return direction.astype(g.dtype), history

    new_updates, new_history = _tree.map_unzip(precondition_leaf, updates, state.history)
    count = optax.safe_int32_increment(state.count)
    return new_updates, WoodburyState(count=count, history=new_history)

  return optax.GradientTransformation(init_fn, update_fn)


def natural_direction(history: jax.Array, position, damping, *, exponent: float = -1.0,
                      damping_mode: str = "absolute", use_cholesky: bool = True) -> jax.Array:
  """Returns ``H (damping I + H^T H)^exponent e_position`` for a stacked history, in float32.

  ``history`` has shape ``(s, *leaf_shape)``; row ``position`` is the current gradient. See
  :func:`woodbury_precondition` for the maths and the safeguards.

  Examples:
    >>> import jax.numpy as jnp
    >>> import ngalore_jax as ng
    >>> history = jnp.array([[1.0, 0.0], [0.0, 2.0]])  # two orthogonal gradients
    >>> # (I + H H^T)^{-1} g for g = (0, 2): 2 / (1 + 4) along the second axis.
    >>> [round(float(x), 4) for x in ng.natural_direction(history, 1, 1.0)]
    [0.0, 0.4]
  """
  s = history.shape[0]
  leaf_ndim = history.ndim - 1
  h = history.astype(jnp.float32)
  # Rescale so the largest entry is 1: the Gram matrix can neither overflow nor underflow.
  scale = jnp.max(jnp.abs(h))
  scale = jnp.where(scale > 0, scale, 1.0)
  h = h / scale
  sharding = _sharding.explicit_sharding(h)
  leaf_axes = ([] if sharding is None else _sharding.spec_axes(sharding.spec, h.ndim)[1:])
  dims = "abcdefghklmnopqr"[:leaf_ndim]
  gram = _sharding.einsum(f"i{dims},j{dims}->ij", h, h, out_axes=[(), ()])
  eps = jnp.finfo(jnp.float32).eps
  if damping_mode == "relative":
    lam = damping * jnp.linalg.eigvalsh(gram)[-1]
  else:
    # damping / scale**2 in two steps: scale**2 alone may underflow for tiny gradients.
    lam = (damping / scale) / scale
  unit = jax.nn.one_hot(position, s, dtype=jnp.float32)
  if use_cholesky:
    # The paper's solve. Floor the damping so the factorisation always exists in float32.
    lam = jnp.maximum(lam, s * eps * jnp.trace(gram))
    lam = jnp.where(lam > 0, lam, 1.0)  # all-zero history: any positive value gives zero out.
    factor = jax.scipy.linalg.cho_factor(gram + lam * jnp.eye(s, dtype=jnp.float32), lower=True)
    weights = jax.scipy.linalg.cho_solve(factor, unit)
    out_scale = 1.0 / scale  # scale ** (1 + 2 * exponent) with exponent = -1
  else:
    eigenvalues, eigenvectors = jnp.linalg.eigh(gram)
    # Directions of H^T H below float32 resolution are null directions of H: H v = 0 there, so
    # they contribute nothing. Keeping them would multiply rounding noise by 1 / damping.
    resolved = eigenvalues > s * eps * jnp.max(eigenvalues)
    powered = jnp.where(resolved, (jnp.maximum(lam, 0.0) + jnp.where(resolved, eigenvalues, 1.0))
                        ** exponent, 0.0)
    weights = eigenvectors @ (powered * (eigenvectors.T @ unit))
    out_scale = scale ** (1.0 + 2.0 * exponent)
  direction = _sharding.einsum(f"i,i{dims}->{dims}", weights, h, out_axes=leaf_axes)
  return direction * out_scale
