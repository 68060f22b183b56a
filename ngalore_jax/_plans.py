"""How one leaf is projected: the static geometry (sides, ranks, reshapes) and its linear algebra.

A plan is computed from a leaf's shape alone, identically in ``init`` and ``update``, so nothing
about the geometry needs to live in the optimizer state.
"""

import dataclasses
import math
from typing import Any, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp

from ngalore_jax import _sharding
from ngalore_jax import _subspace

PROJ_TYPES = ("std", "reverse_std", "left", "right", "full")
# The projections with one factor per matrix and a full-size dimension left in the coefficients
# (what Fira and APOLLO scale per row or column).
ONE_SIDED_PROJ_TYPES = ("std", "reverse_std", "left", "right")


class MatrixAxes(NamedTuple):
  """Which axes of a leaf form the matrix that GaLore projects.

  The same convention as ``optax.contrib.GaLoreDimensionNumbers`` (whose instances are accepted
  too): ``reduction_axis`` (the input side, rows) and ``output_axis`` (columns), each an int or a
  sequence of ints. Unlike optax, axes named in neither are **batch** axes: a stacked
  ``[layers, in, out]`` kernel with ``MatrixAxes(1, 2)`` is a batch of ``layers`` matrices, each
  with its own projector.

  Attributes:
    reduction_axis: Axis or axes forming the rows of the matrix.
    output_axis: Axis or axes forming the columns.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> import ngalore_jax as ng
    >>> stacked = {"w": jnp.zeros((4, 32, 16))}  # 4 layers of 32 x 16
    >>> tx = ng.galore_projection(optax.scale_by_adam(), rank=2,
    ...                           dimension_numbers=ng.MatrixAxes(1, 2))
    >>> tx.init(stacked).inner_states["w"].mu.shape  # per layer: 32 x r
    (4, 32, 2)
  """
  reduction_axis: Union[int, Sequence[int]] = 0
  output_axis: Union[int, Sequence[int]] = 1


TUCKER = "tucker"


def _as_axes(axis, ndim: int) -> tuple[int, ...]:
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


class Unprojected:
  """A leaf the inner transformation sees at full size (0-D/1-D leaves, or excluded ones)."""
  num_factors = 0


class _MatrixLayout:
  """Reshapes between a leaf and its (batch of) matrices ``[*batch_shape, m, n]``.

  Mixed into the dataclasses below, which define ``shape``, ``perm`` (the transpose to
  ``(batch..., rows..., cols...)``, ``None`` if the identity), ``batch_shape``, ``m`` and ``n``.
  """

  def to_matrix(self, x: jax.Array) -> jax.Array:
    if self.perm is None:
      return x
    x = jnp.transpose(_sharding.replicate_matrix_dims(x, x.ndim), self.perm)
    return x.reshape(self.batch_shape + (self.m, self.n))

  def from_matrix(self, x: jax.Array) -> jax.Array:
    if self.perm is None:
      return x
    permuted_shape = tuple(self.shape[p] for p in self.perm)
    return jnp.transpose(x.reshape(permuted_shape), _inverse(self.perm))


@dataclasses.dataclass(frozen=True)
class MatrixPlan(_MatrixLayout):
  """A (batch of) matrix ``[..., m, n]`` projected on one side with rank ``rank``.

  ``side="left"``: projector ``P`` is ``[..., m, r]``, coefficients ``P^T G`` are ``[..., r, n]``.
  ``side="right"``: projector ``Q`` is ``[..., n, r]``, coefficients ``G Q`` are ``[..., m, r]``.
  """
  shape: tuple[int, ...]
  perm: Optional[tuple[int, ...]]  # transpose to (batch..., rows..., cols...), None if identity
  batch_shape: tuple[int, ...]
  m: int
  n: int
  side: str
  rank: int
  num_factors = 1

  def coefficient_shape(self):
    if self.side == "left":
      return self.batch_shape + (self.rank, self.n)
    return self.batch_shape + (self.m, self.rank)

  def factor_shapes(self):
    return (self.batch_shape + ((self.m if self.side == "left" else self.n), self.rank),)

  # -- sharding (explicit meshes) ---------------------------------------------------------------
  def _axes(self, like: jax.Array):
    """Mesh axes for (projector, coefficients, full matrix), or None when not explicit/permuted.

    The coefficients keep the full-size dimension of the gradient; it is split over the mesh
    axes of *both* gradient dimensions when divisible (so FSDP over the projected-away side is
    not lost), else over its own axes; when the full-size dimension divides by neither, the rank
    dimension is split instead if it can be, else the coefficients are replicated. The projector
    is split over the same mesh axes, along its long dimension or else its rank dimension.
    """
    sharding = _sharding.explicit_sharding(like)
    if sharding is None or self.perm is not None:
      return None
    mesh = sharding.mesh
    axes = _sharding.spec_axes(sharding.spec, like.ndim)
    batch_axes, (rows, cols) = axes[:-2], axes[-2:]
    fits = lambda size, ax: ax and size % _sharding.axes_size(mesh, ax) == 0
    if self.side == "left":
      own, other, full_size, proj_size = cols, rows, self.n, self.m
    else:
      own, other, full_size, proj_size = rows, cols, self.m, self.n
    full, rank_dim = (), ()
    if fits(full_size, own + other):
      full = own + other
    elif fits(full_size, own):
      full = own
    elif fits(self.rank, own + other):
      rank_dim = own + other  # e.g. LLaMA-1B's 5461-wide MLP: split the rank instead
    pool = own + other  # every mesh axis this weight is split over
    if fits(proj_size, pool):
      projector = batch_axes + [pool, ()]
    elif fits(self.rank, pool):
      projector = batch_axes + [(), pool]
    else:
      projector = batch_axes + [other if fits(proj_size, other) else (), ()]
    if self.side == "left":
      coefficients = batch_axes + [rank_dim, full]
    else:
      coefficients = batch_axes + [full, rank_dim]
    return mesh, projector, coefficients, batch_axes + [rows, cols]

  # -- linear algebra ---------------------------------------------------------------------------
  def init_factors(self, like: jax.Array, dtype) -> tuple[jax.Array, ...]:
    axes = self._axes(like)
    return (_sharding.zeros(self.factor_shapes()[0], dtype, like=like,
                            axes_per_dim=None if axes is None else axes[1]),)

  def init_coefficients(self, like: jax.Array, dtype) -> jax.Array:
    axes = self._axes(like)
    return _sharding.zeros(self.coefficient_shape(), dtype, like=like,
                           axes_per_dim=None if axes is None else axes[2])

  def compute_factors(self, grad: jax.Array, dtype, **svd_kwargs) -> tuple[jax.Array, ...]:
    matrix = self.to_matrix(grad)
    if self.side == "right":
      matrix = jnp.swapaxes(matrix, -1, -2)
    basis = _subspace.top_left_singular_vectors(matrix, self.rank, **svd_kwargs).astype(dtype)
    axes = self._axes(grad)
    if axes is not None:
      basis = _sharding.reshard(basis, axes[0], axes[1])
    return (basis,)

  def project(self, grad: jax.Array, factors) -> jax.Array:
    (basis,) = factors
    matrix = self.to_matrix(grad).astype(jnp.float32)
    basis = basis.astype(jnp.float32)
    axes = self._axes(grad)
    out_axes = None if axes is None else axes[2]
    if self.side == "left":
      coefficients = _sharding.einsum("...mr,...mn->...rn", basis, matrix, out_axes=out_axes)
    else:
      coefficients = _sharding.einsum("...mn,...nr->...mr", matrix, basis, out_axes=out_axes)
    return coefficients.astype(grad.dtype)

  def project_back(self, coefficients: jax.Array, factors, like: jax.Array) -> jax.Array:
    (basis,) = factors
    coefficients = coefficients.astype(jnp.float32)
    basis = basis.astype(jnp.float32)
    axes = self._axes(like)
    out_axes = None if axes is None else axes[3]
    if self.side == "left":
      matrix = _sharding.einsum("...mr,...rn->...mn", basis, coefficients, out_axes=out_axes)
    else:
      matrix = _sharding.einsum("...mr,...nr->...mn", coefficients, basis, out_axes=out_axes)
    return self.from_matrix(matrix)

  def rotation(self, new_factors, old_factors):
    """``R = B_new^T B_old``: maps coefficients in the old basis to the new one."""
    return (_overlap(new_factors[0], old_factors[0]),)

  def rotate(self, x: jax.Array, rotation, *, squared: bool = False) -> jax.Array:
    """Applies the rotation to coefficient-shaped ``x`` (extra leading axes allowed).

    ``squared=True`` applies ``R * R`` elementwise instead: the diagonal of ``R diag(v) R^T``,
    which is how a diagonal second moment transforms (it stays non-negative).
    """
    (r,) = rotation
    r = r * r if squared else r
    xf = x.astype(jnp.float32)
    sharding = _sharding.explicit_sharding(x)
    out_axes = None if sharding is None else _sharding.spec_axes(sharding.spec, x.ndim)
    if self.side == "left":
      out = _sharding.einsum("...ab,...bn->...an", r, xf, out_axes=out_axes)
    else:
      out = _sharding.einsum("...mb,...ab->...ma", xf, r, out_axes=out_axes)
    return out.astype(x.dtype)

  def axis_rotations(self, rotation) -> dict[int, jax.Array]:
    """The rotation acting on each coefficient axis (``-2``: rows, ``-1``: columns) a refresh
    moves: the rank axis. State laid out along the other axis (e.g. a Kronecker factor over the
    full-size side) has no rotation to follow."""
    (r,) = rotation
    return {-2: r} if self.side == "left" else {-1: r}


@dataclasses.dataclass(frozen=True)
class TwoSidedPlan(_MatrixLayout):
  """A (batch of) matrix ``[..., m, n]`` projected on both sides (``proj_type="full"``).

  Factors ``U`` (``[..., m, r]``) and ``V`` (``[..., n, r]``), the top-``r`` left and right
  singular vectors of one SVD; coefficients ``U^T G V`` are ``[..., r, r]``, and the projection
  back is ``U C V^T``. A refresh moves the coefficients by ``R_l C R_r^T`` with
  ``R_l = U_new^T U_old`` and ``R_r = V_new^T V_old``.
  """
  shape: tuple[int, ...]
  perm: Optional[tuple[int, ...]]
  batch_shape: tuple[int, ...]
  m: int
  n: int
  rank: int
  num_factors = 2

  def coefficient_shape(self):
    return self.batch_shape + (self.rank, self.rank)

  def factor_shapes(self):
    return (self.batch_shape + (self.m, self.rank), self.batch_shape + (self.n, self.rank))

  # -- sharding (explicit meshes) ---------------------------------------------------------------
  def _axes(self, like: jax.Array):
    """Mesh axes for (the two factors, coefficients, full matrix), or None when not explicit.

    Each factor is split like the weight's dimension it spans (``U`` like the rows, ``V`` like
    the columns; that dimension divides, since the weight is split the same way). The ``r x r``
    coefficients (and the inner state on them) are split over the rows' mesh axes along their
    first dimension and the columns' along their second, each only where ``r`` divides, else
    replicated along that dimension.
    """
    sharding = _sharding.explicit_sharding(like)
    if sharding is None or self.perm is not None:
      return None
    mesh = sharding.mesh
    axes = _sharding.spec_axes(sharding.spec, like.ndim)
    batch_axes, (rows, cols) = axes[:-2], axes[-2:]
    fits = lambda ax: bool(ax) and self.rank % _sharding.axes_size(mesh, ax) == 0
    coefficients = batch_axes + [rows if fits(rows) else (), cols if fits(cols) else ()]
    return (mesh, (batch_axes + [rows, ()], batch_axes + [cols, ()]), coefficients,
            batch_axes + [rows, cols])

  # -- linear algebra ---------------------------------------------------------------------------
  def init_factors(self, like: jax.Array, dtype) -> tuple[jax.Array, ...]:
    axes = self._axes(like)
    return tuple(_sharding.zeros(shape, dtype, like=like,
                                 axes_per_dim=None if axes is None else axes[1][i])
                 for i, shape in enumerate(self.factor_shapes()))

  def init_coefficients(self, like: jax.Array, dtype) -> jax.Array:
    axes = self._axes(like)
    return _sharding.zeros(self.coefficient_shape(), dtype, like=like,
                           axes_per_dim=None if axes is None else axes[2])

  def compute_factors(self, grad: jax.Array, dtype, **svd_kwargs) -> tuple[jax.Array, ...]:
    u, v = _subspace.top_singular_vectors(self.to_matrix(grad), self.rank, **svd_kwargs)
    factors = (u.astype(dtype), v.astype(dtype))
    axes = self._axes(grad)
    if axes is not None:
      factors = tuple(_sharding.reshard(f, axes[0], a) for f, a in zip(factors, axes[1]))
    return factors

  def project(self, grad: jax.Array, factors) -> jax.Array:
    u, v = (f.astype(jnp.float32) for f in factors)
    matrix = self.to_matrix(grad).astype(jnp.float32)
    axes = self._axes(grad)
    # U^T G first ([r, n], split like G's columns), then times V.
    half_axes = None if axes is None else axes[3][:-2] + [(), axes[3][-1]]
    half = _sharding.einsum("...mr,...mn->...rn", u, matrix, out_axes=half_axes)
    coefficients = _sharding.einsum("...rn,...ns->...rs", half, v,
                                    out_axes=None if axes is None else axes[2])
    return coefficients.astype(grad.dtype)

  def project_back(self, coefficients: jax.Array, factors, like: jax.Array) -> jax.Array:
    u, v = (f.astype(jnp.float32) for f in factors)
    coefficients = coefficients.astype(jnp.float32)
    axes = self._axes(like)
    half_axes = None if axes is None else axes[3][:-2] + [(), axes[3][-1]]
    half = _sharding.einsum("...rs,...ns->...rn", coefficients, v, out_axes=half_axes)
    matrix = _sharding.einsum("...mr,...rn->...mn", u, half,
                              out_axes=None if axes is None else axes[3])
    return self.from_matrix(matrix)

  def rotation(self, new_factors, old_factors):
    """``(R_l, R_r) = (U_new^T U_old, V_new^T V_old)``."""
    return tuple(_overlap(new, old) for new, old in zip(new_factors, old_factors))

  def rotate(self, x: jax.Array, rotation, *, squared: bool = False) -> jax.Array:
    """``R_l x R_r^T`` for coefficient-shaped ``x`` (extra leading axes allowed).

    ``squared=True`` uses ``R_l * R_l`` and ``R_r * R_r`` (elementwise) instead, the rule for
    a diagonal second moment on each side (it stays non-negative).
    """
    left, right = ((r * r for r in rotation) if squared else rotation)
    xf = x.astype(jnp.float32)
    sharding = _sharding.explicit_sharding(x)
    out_axes = None if sharding is None else _sharding.spec_axes(sharding.spec, x.ndim)
    out = _sharding.einsum("...ab,...bc->...ac", left, xf, out_axes=out_axes)
    out = _sharding.einsum("...ac,...dc->...ad", out, right, out_axes=out_axes)
    return out.astype(x.dtype)

  def axis_rotations(self, rotation) -> dict[int, jax.Array]:
    """Both coefficient axes are rank axes: ``R_l`` moves the rows, ``R_r`` the columns."""
    left, right = rotation
    return {-2: left, -1: right}


@dataclasses.dataclass(frozen=True)
class TuckerPlan:
  """A tensor projected with one orthonormal factor per mode (HOSVD / Tucker).

  Modes no larger than the rank are left as they are (their factor would be a square rotation,
  which changes nothing but costs memory). Coefficients are the core tensor.
  """
  shape: tuple[int, ...]
  ranks: tuple[Optional[int], ...]  # per mode: kept rank, or None when the mode is not projected

  @property
  def num_factors(self):
    return sum(r is not None for r in self.ranks)

  def _modes(self):
    return [i for i, r in enumerate(self.ranks) if r is not None]

  def coefficient_shape(self):
    return tuple(d if r is None else r for d, r in zip(self.shape, self.ranks))

  def factor_shapes(self):
    return tuple((self.shape[i], self.ranks[i]) for i in self._modes())

  def init_factors(self, like, dtype):
    del like
    return tuple(jnp.zeros(s, dtype) for s in self.factor_shapes())

  def init_coefficients(self, like, dtype):
    del like
    return jnp.zeros(self.coefficient_shape(), dtype)

  def compute_factors(self, grad, dtype, **svd_kwargs):
    g = _sharding.replicate_matrix_dims(grad.astype(jnp.float32), grad.ndim)
    factors = []
    for mode in self._modes():
      unfolded = jnp.moveaxis(g, mode, 0).reshape(self.shape[mode], -1)
      factors.append(_subspace.top_left_singular_vectors(
          unfolded, self.ranks[mode], **svd_kwargs).astype(dtype))
    return tuple(factors)

  def _multiply_modes(self, x, matrices, offset=0):
    """x times matrices[j] (as ``[out, in]``) along each projected mode (shifted by ``offset``)."""
    for mode, matrix in zip(self._modes(), matrices):
      axis = mode + offset
      x = jnp.moveaxis(jnp.tensordot(matrix, x, axes=([1], [axis])), 0, axis)
    return x

  def project(self, grad, factors):
    g = _sharding.replicate_matrix_dims(grad.astype(jnp.float32), grad.ndim)
    return self._multiply_modes(g, [f.astype(jnp.float32).T for f in factors]).astype(grad.dtype)

  def project_back(self, coefficients, factors, like):
    del like
    return self._multiply_modes(coefficients.astype(jnp.float32),
                                [f.astype(jnp.float32) for f in factors])

  def rotation(self, new_factors, old_factors):
    return tuple(n.astype(jnp.float32).T @ o.astype(jnp.float32)
                 for n, o in zip(new_factors, old_factors))

  def rotate(self, x, rotation, *, squared=False):
    rs = [r * r for r in rotation] if squared else list(rotation)
    offset = x.ndim - len(self.shape)
    return self._multiply_modes(x.astype(jnp.float32), rs, offset).astype(x.dtype)

  def axis_rotations(self, rotation) -> dict[int, jax.Array]:
    """Per-matrix rotations of the core's last two axes, when its leading modes are not
    projected; else none (a rotated leading mode mixes the matrices the core is made of)."""
    ndim = len(self.shape)
    modes = self._modes()
    if any(mode < ndim - 2 for mode in modes):
      return {}
    return {mode - ndim: r for mode, r in zip(modes, rotation)}


def align_signs(new_factors, old_factors):
  """Flips each new basis vector to point the way the old one did.

  Singular vectors are defined up to sign, and LAPACK/cuSOLVER pick different ones. Under
  ``refresh_policy="keep"`` the inner state (Adam's first moment, the gradient history) is
  reused in the new basis, so a flipped vector would pair a moment with the negated coordinate
  and the run would depend on the backend. With no old basis (the first refresh), the sign makes
  each vector's entries sum to a non-negative value, which is just as deterministic.
  """
  aligned = []
  for new, old in zip(new_factors, old_factors):
    new32 = new.astype(jnp.float32)
    overlap = jnp.sum(new32 * old.astype(jnp.float32), axis=-2, keepdims=True)
    column_sum = jnp.sum(new32, axis=-2, keepdims=True)
    reference = jnp.where(overlap != 0, overlap, column_sum)
    aligned.append(jnp.where(reference < 0, -new32, new32).astype(new.dtype))
  return tuple(aligned)


def _overlap(new: jax.Array, old: jax.Array) -> jax.Array:
  """``new^T old`` for stacks of bases ``[..., d, r]``, in float32 (replicated matrix dims)."""
  new, old = new.astype(jnp.float32), old.astype(jnp.float32)
  sharding = _sharding.explicit_sharding(new)
  batch_axes = [] if sharding is None else _sharding.spec_axes(sharding.spec, new.ndim)[:-2]
  return _sharding.einsum("...ka,...kb->...ab", new, old, out_axes=batch_axes + [(), ()])


def _inverse(perm):
  inv = [0] * len(perm)
  for i, p in enumerate(perm):
    inv[p] = i
  return tuple(inv)


def _side(proj_type: str, m: int, n: int) -> str:
  """Which side holds the projector. 'std' (galore-torch): the smaller side's singular vectors."""
  if proj_type == "left":
    return "left"
  if proj_type == "right":
    return "right"
  smaller_is_right = m >= n  # galore-torch: rows >= cols -> right projection, coefficients m x r
  if proj_type == "std":
    return "right" if smaller_is_right else "left"
  return "left" if smaller_is_right else "right"  # reverse_std


def check_two_sided(shape: tuple[int, ...], spec: Any) -> None:
  """Raises a ``ValueError`` naming ``proj_type`` if ``proj_type="full"`` cannot apply to a
  leaf of ``shape`` given its *explicit* dimension-number entry ``spec``.

  ``"full"`` projects matrices on both sides. A leaf marked ``"tucker"`` already has one factor
  per mode (two-sided on a matrix), and a leaf with fewer than 2 dims given a
  :class:`MatrixAxes` has no matrix to project: both are contradictions, not choices to
  override silently.
  """
  if spec is None:
    return
  if isinstance(spec, str) and spec == TUCKER:
    raise ValueError(
        f"`proj_type`='full' projects matrices on both sides, but a leaf of shape {shape} is "
        "marked 'tucker' in `dimension_numbers` (a Tucker projection already has a factor per "
        "mode). Give it a MatrixAxes for the two-sided matrix projection, or use another "
        "proj_type.")
  if len(shape) < 2:
    raise ValueError(
        f"`proj_type`='full' projects matrices on both sides, but `dimension_numbers` gives a "
        f"MatrixAxes to a leaf of shape {shape}, which has no matrix; give it None.")


def make_plan(shape: tuple[int, ...], spec: Any, *, rank: int, proj_type: str):
  """Builds the plan for a leaf of ``shape`` given its dimension-number entry ``spec``.

  ``spec`` is ``None`` (not projected), ``"tucker"``, or a :class:`MatrixAxes` /
  ``optax.contrib.GaLoreDimensionNumbers``. ``proj_type="full"`` makes a :class:`TwoSidedPlan`
  of a matrix, any other a one-sided :class:`MatrixPlan`; a ``"tucker"`` leaf gets a
  :class:`TuckerPlan` whatever the ``proj_type``.
  """
  ndim = len(shape)
  if spec is None or ndim < 2:
    return Unprojected()
  if spec == TUCKER:
    ranks = tuple(min(rank, d) if d > rank else None for d in shape)
    if all(r is None for r in ranks):
      return Unprojected()
    return TuckerPlan(shape=tuple(shape), ranks=ranks)
  rows = _as_axes(spec.reduction_axis, ndim)
  cols = _as_axes(spec.output_axis, ndim)
  if set(rows) & set(cols):
    raise ValueError(f"MatrixAxes: reduction axes {rows} and output axes {cols} overlap "
                     f"for a leaf of shape {shape}.")
  batch = tuple(a for a in range(ndim) if a not in rows and a not in cols)
  perm = batch + rows + cols
  m = math.prod(shape[a] for a in rows)
  n = math.prod(shape[a] for a in cols)
  batch_shape = tuple(shape[a] for a in batch)
  identity = perm == tuple(range(ndim)) and len(rows) == 1 and len(cols) == 1
  if proj_type == "full":
    return TwoSidedPlan(shape=tuple(shape), perm=None if identity else perm,
                        batch_shape=batch_shape, m=m, n=n, rank=min(rank, m, n))
  return MatrixPlan(shape=tuple(shape), perm=None if identity else perm,
                    batch_shape=batch_shape, m=m, n=n, side=_side(proj_type, m, n),
                    rank=min(rank, m, n))
