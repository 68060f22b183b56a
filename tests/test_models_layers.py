"""Model pieces (RMSNorm, RoPE, SwiGLU, attention) against NumPy references."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import layers

RNG = np.random.default_rng(0)


def _np_rms_norm(x, scale, eps):
  x = x.astype(np.float64)
  return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * scale


def _np_silu(x):
  return x / (1.0 + np.exp(-x))


def _np_rope(x, positions, theta):
  """Reference RoPE written as explicit 2-D rotations of the pairs (i, i + d/2)."""
  out = np.array(x, dtype=np.float64)
  half = x.shape[-1] // 2
  for i in range(half):
    angle = positions[..., None] * theta ** (-2.0 * i / x.shape[-1])  # [b, s, 1]
    a, b = x[..., i], x[..., i + half]
    out[..., i] = a * np.cos(angle) - b * np.sin(angle)
    out[..., i + half] = a * np.sin(angle) + b * np.cos(angle)
  return out


def test_rms_norm_matches_numpy():
  x = RNG.normal(size=(3, 5, 16)).astype(np.float32) * 3.0
  scale = RNG.normal(size=(16,)).astype(np.float32)
  got = layers.rms_norm(jnp.asarray(x), jnp.asarray(scale), 1e-6)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, _np_rms_norm(x, scale, 1e-6), rtol=1e-5, atol=1e-6)


def test_rms_norm_module_computes_in_float32_and_returns_compute_dtype():
  norm = layers.RMSNorm(16, eps=1e-6, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  x = RNG.normal(size=(2, 16)).astype(np.float32) * 100.0  # x**2 would lose bits in bf16
  got = norm(jnp.asarray(x, jnp.bfloat16))
  assert got.dtype == jnp.bfloat16
  want = _np_rms_norm(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), 1.0, 1e-6)
  np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=1e-2)


def test_swiglu_matches_numpy():
  mlp = layers.MLP(8, 12, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  x = RNG.normal(size=(2, 3, 8)).astype(np.float32)
  gate, up, down = (np.asarray(m.kernel[...], np.float64) for m in (mlp.gate, mlp.up, mlp.down))
  want = (_np_silu(x @ gate) * (x @ up)) @ down
  np.testing.assert_allclose(mlp(jnp.asarray(x)), want, rtol=1e-5, atol=1e-6)


def test_rope_matches_numpy_rotation():
  x = RNG.normal(size=(2, 6, 3, 8)).astype(np.float32)
  positions = RNG.integers(0, 500, size=(2, 6))
  got = layers.apply_rope(jnp.asarray(x), jnp.asarray(positions), theta=10000.0)
  np.testing.assert_allclose(got, _np_rope(x, positions, 10000.0), rtol=1e-4, atol=1e-4)
  # Position 0 is the identity.
  same = layers.apply_rope(jnp.asarray(x), jnp.zeros((2, 6), jnp.int32), theta=10000.0)
  np.testing.assert_array_equal(same, x)


@pytest.mark.parametrize("theta", [10000.0, 500000.0])
def test_rope_scores_depend_only_on_relative_position(theta):
  q = jnp.asarray(RNG.normal(size=(1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(RNG.normal(size=(1, 1, 1, 16)), jnp.float32)

  def score(m, n):
    qm = layers.apply_rope(q, jnp.full((1, 1), m), theta=theta)
    kn = layers.apply_rope(k, jnp.full((1, 1), n), theta=theta)
    return float(jnp.sum(qm * kn))

  for offset in (0, 1, 7):
    reference = score(offset, 0)
    for shift in (3, 100, 411):
      np.testing.assert_allclose(score(offset + shift, shift), reference, rtol=1e-4, atol=1e-4)
  assert abs(score(5, 0) - score(0, 0)) > 1e-3  # and it does depend on the offset


def test_causal_attention_matches_numpy_with_grouped_heads():
  batch, seq, heads, kv_heads, dim = 2, 5, 6, 2, 4
  q = RNG.normal(size=(batch, seq, heads, dim)).astype(np.float32)
  k = RNG.normal(size=(batch, seq, kv_heads, dim)).astype(np.float32)
  v = RNG.normal(size=(batch, seq, kv_heads, dim)).astype(np.float32)
  got = layers.causal_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v))
  assert got.shape == (batch, seq, heads * dim)

  want = np.zeros((batch, seq, heads, dim))
  group = heads // kv_heads
  for h in range(heads):
    kh, vh = k[:, :, h // group], v[:, :, h // group]
    scores = np.einsum("btd,bsd->bts", q[:, :, h], kh) / np.sqrt(dim)
    scores = np.where(np.tril(np.ones((seq, seq), bool)), scores, -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want[:, :, h] = np.einsum("bts,bsd->btd", probs, vh)
  np.testing.assert_allclose(got, want.reshape(batch, seq, -1), rtol=1e-5, atol=1e-6)


def test_linear_kernel_is_in_out_and_casts_to_compute_dtype():
  lin = layers.Linear(3, 7, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
  assert lin.kernel[...].shape == (3, 7) and lin.kernel[...].dtype == jnp.float32
  assert lin(jnp.ones((2, 3))).dtype == jnp.bfloat16
