"""Orthonormal bases for the dominant singular subspace of a (batch of) matrix: exact or randomized."""

import jax
import jax.numpy as jnp

from ngalore_jax import _sharding


def top_singular_vectors(matrix: jax.Array, rank: int, *, method: str = "exact",
                         key: jax.Array | None = None, oversampling: int = 8,
                         power_iterations: int = 2) -> tuple[jax.Array, jax.Array]:
  """Returns the top-``rank`` left and right singular vectors of ``matrix``, from one SVD.

  Args:
    matrix: A matrix or a batch of matrices ``[..., m, n]``.
    rank: Number of vectors to keep (``<= min(m, n)``).
    method: ``"exact"``: a thin SVD. ``"randomized"``: the randomized range finder with subspace
      iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4), then an SVD of the small
      ``(rank + oversampling) x n`` matrix; costs ``O(m n (rank + oversampling))`` per iteration
      instead of ``O(m n min(m, n))``.
    key: PRNG key for the random test matrix (randomized only).
    oversampling: Extra random directions beyond ``rank`` (randomized only).
    power_iterations: Subspace iterations; each multiplies by ``A A^T`` and re-orthonormalizes,
      sharpening a slowly decaying spectrum (randomized only).

  Returns:
    ``(U, V)``, ``[..., m, rank]`` and ``[..., n, rank]`` with orthonormal columns, in float32:
    column ``i`` of each is the ``i``-th singular pair (``A v_i = s_i u_i``).
  """
  a = _sharding.replicate_matrix_dims(matrix.astype(jnp.float32))
  m, n = a.shape[-2:]
  if method == "exact" or rank + oversampling >= min(m, n):
    u, _, vh = jnp.linalg.svd(a, full_matrices=False)
    return u[..., :rank], jnp.swapaxes(vh[..., :rank, :], -1, -2)
  sketch = rank + oversampling
  omega = jax.random.normal(key, a.shape[:-2] + (n, sketch), jnp.float32)
  q, _ = jnp.linalg.qr(a @ omega)
  for _ in range(power_iterations):
    z, _ = jnp.linalg.qr(jnp.swapaxes(a, -1, -2) @ q)
    q, _ = jnp.linalg.qr(a @ z)
  small = jnp.swapaxes(q, -1, -2) @ a  # [..., sketch, n]
  u_small, _, vh_small = jnp.linalg.svd(small, full_matrices=False)
  return q @ u_small[..., :rank], jnp.swapaxes(vh_small[..., :rank, :], -1, -2)


def top_left_singular_vectors(matrix: jax.Array, rank: int, **kwargs) -> jax.Array:
  """The ``U`` of :func:`top_singular_vectors` (same arguments): ``[..., m, rank]``, float32."""
  return top_singular_vectors(matrix, rank, **kwargs)[0]
