"""models.generate and the key/value-cache path, against transformers' LlamaForCausalLM.

Small random models (nothing downloaded): transformers' greedy generate() is the reference for
the token sequence, the cache-free forward pass for the cached logits, and closed-form
probabilities for the sampler. The SmolLM2 chat check is in test_models_gguf.py.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import models
from models import decoding
from models import llama

torch = pytest.importorskip("torch", reason="torch is the reference for generate (dev extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")

VOCAB = 96
NEW = 16  # tokens generated: one compiled loop shared by most tests


@functools.partial(jax.jit, static_argnums=0)
def _decode(graphdef, state, tokens, cache, start, positions=None, logits_at=None):
  return nnx.merge(graphdef, state).decode(tokens, cache, start, positions=positions,
                                           logits_at=logits_at)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, positions=None):
  return nnx.merge(graphdef, state)(tokens, positions)


def _split(model):
  return nnx.split(model)


def _pair(tmp_path, seed, **overrides):
  """A random transformers LLaMA and the same weights loaded here."""
  kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=500.0, rms_norm_eps=1e-5, initializer_range=0.2)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
  reference.save_pretrained(tmp_path)
  return reference, models.load_hf_llama(tmp_path)


@pytest.fixture(scope="module")
def gqa_pair(tmp_path_factory):
  return _pair(tmp_path_factory.mktemp("gqa"), seed=0)


def _reference_generate(reference, prompt, max_new_tokens, eos_ids=None):
  with torch.no_grad():
    out = reference.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=eos_ids, pad_token_id=0,
                             attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
  return out[0, len(prompt):].tolist()


def _prompt(length, seed):
  return np.random.default_rng(seed).integers(0, VOCAB, length).tolist()


@pytest.mark.parametrize("length", [5, 16, 23])  # prompt buckets 16, 16 (exact fit), 32
def test_greedy_matches_transformers(gqa_pair, length):
  reference, model = gqa_pair
  prompt = _prompt(length, seed=length)
  want = _reference_generate(reference, prompt, NEW)
  assert len(want) == NEW and len(set(want)) > 3  # a real continuation, not one repeated id
  assert models.generate(model, prompt, NEW).tolist() == want


def test_stops_after_first_eos_like_transformers(gqa_pair):
  reference, model = gqa_pair
  prompt = _prompt(9, seed=1)
  free = _reference_generate(reference, prompt, NEW)
  stop = free[4]
  eos_ids = [stop, VOCAB - 1] if stop != VOCAB - 1 else [stop, stop]
  want = _reference_generate(reference, prompt, NEW, eos_ids=eos_ids)
  assert want[-1] == stop and len(want) == free.index(stop) + 1
  got = models.generate(model, np.asarray([prompt]), NEW, eos_ids=eos_ids)  # [1, seq] works too
  assert got.tolist() == want
  # A stop id as the very first token ends generation at once.
  assert models.generate(model, prompt, NEW, eos_ids=[free[0]] * 2).tolist() == [free[0]]


def test_tied_multi_query_model_matches_transformers(tmp_path):
  reference, model = _pair(tmp_path, seed=3, tie_word_embeddings=True, num_key_value_heads=1)
  assert model.lm_head is None
  prompt = _prompt(7, seed=3)
  assert models.generate(model, prompt, 12).tolist() == _reference_generate(reference, prompt, 12)


def test_cached_decode_equals_full_forward(gqa_pair):
  _, model = gqa_pair
  graphdef, state = _split(model)
  tokens = jnp.asarray([_prompt(12, seed=4)], jnp.int32)
  want = np.asarray(_forward(graphdef, state, tokens))
  cache = model.init_cache(1, 16)
  got, cache = _decode(graphdef, state, tokens[:, :5], cache, 0)  # prefill in 2 chunks, steps
  parts = [np.asarray(got)]
  got, cache = _decode(graphdef, state, tokens[:, 5:9], cache, 5)
  parts.append(np.asarray(got))
  for t in range(9, 12):
    got, cache = _decode(graphdef, state, tokens[:, t:t + 1], cache, t)
    parts.append(np.asarray(got))
  np.testing.assert_allclose(np.concatenate(parts, axis=1), want, rtol=1e-5, atol=1e-5)
  # Only one token's logits, from a traced index.
  last, _ = _decode(graphdef, state, tokens, model.init_cache(1, 12), 0, logits_at=10)
  assert last.shape == (1, VOCAB)
  np.testing.assert_allclose(np.asarray(last), want[:, 10], rtol=1e-5, atol=1e-5)


def test_cached_rope_uses_positions_not_slots(gqa_pair):
  _, model = gqa_pair
  graphdef, state = _split(model)
  tokens = jnp.asarray([_prompt(6, seed=5)], jnp.int32)
  # Slots 0..5 hold positions with a gap (RoPE sees only differences, so a gap, not a shift).
  positions = jnp.asarray([[0, 1, 2, 30, 31, 32]])
  want = np.asarray(_forward(graphdef, state, tokens, positions))
  assert not np.allclose(want[:, 3:], np.asarray(_forward(graphdef, state, tokens))[:, 3:],
                         atol=1e-2)
  cache = model.init_cache(1, 8)
  head, cache = _decode(graphdef, state, tokens[:, :4], cache, 0, positions[:, :4])
  tail, _ = _decode(graphdef, state, tokens[:, 4:], cache, 4, positions[:, 4:])
  np.testing.assert_allclose(np.concatenate([head, tail], axis=1), want, rtol=1e-5, atol=1e-5)


def test_decode_in_bfloat16_runs_close_to_float32(tmp_path):
  _, model = _pair(tmp_path, seed=6)
  tokens = jnp.asarray([_prompt(8, seed=6)], jnp.int32)
  model16 = models.load_hf_llama(tmp_path, dtype="bfloat16")
  logits, cache = _decode(*_split(model16), tokens, model16.init_cache(1, 8), 0)
  assert cache[0].k.dtype == jnp.bfloat16 and logits.dtype == jnp.float32
  want = np.asarray(_forward(*_split(model), tokens))
  assert np.abs(np.asarray(logits) - want).max() < 0.05 * np.abs(want).max()


def test_sampling(gqa_pair):
  _, model = gqa_pair
  prompt = _prompt(6, seed=7)
  greedy = models.generate(model, prompt, NEW).tolist()
  key = jax.random.key(0)
  # A nucleus narrower than any token's probability keeps only the most likely one.
  assert models.generate(model, prompt, NEW, temperature=1.0, top_p=1e-6, rng=key).tolist() == (
      greedy)
  hot = dict(temperature=5.0, top_p=0.999)  # the same compiled loop: only values change
  first = models.generate(model, prompt, NEW, rng=key, **hot).tolist()
  assert models.generate(model, prompt, NEW, rng=key, **hot).tolist() == first  # same key
  others = [models.generate(model, prompt, NEW, rng=jax.random.key(s), **hot).tolist()
            for s in range(1, 4)]
  assert any(o != first for o in others)
  assert all(0 <= t < VOCAB for o in others for t in o)


@jax.jit
def _draw(logits, temperature, top_p):
  keys = jax.random.split(jax.random.key(42), 4000)
  return jax.vmap(lambda k: decoding.sample_token(logits, k, temperature, top_p))(keys)


def _frequencies(logits, temperature, top_p):
  ids = np.asarray(_draw(logits, jnp.float32(temperature), jnp.float32(top_p)))
  return np.bincount(ids, minlength=logits.shape[0]) / ids.size


def test_sample_token_distribution_matches_closed_form():
  probs = np.array([0.1, 0.4, 0.2, 0.3])
  logits = jnp.log(jnp.asarray(probs, jnp.float32))
  tolerance = 4 * np.sqrt(0.25 / 4000)  # 4 standard deviations of a frequency
  # Temperature 2: p ** (1/2), renormalised.
  want = np.sqrt(probs) / np.sqrt(probs).sum()
  np.testing.assert_allclose(_frequencies(logits, 2.0, 1.0), want, atol=tolerance)
  # top_p 0.6: 0.4 + 0.3 reach it, so only ids 1 and 3 remain, in ratio 4 : 3.
  np.testing.assert_allclose(_frequencies(logits, 1.0, 0.6), [0, 4 / 7, 0, 3 / 7], atol=tolerance)
  # top_p exactly reached by the first token alone.
  np.testing.assert_allclose(_frequencies(logits, 1.0, 0.4), [0, 1, 0, 0])
  assert int(decoding.sample_token(logits, None)) == 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(ids=[]), "non-empty"),
    (dict(ids=[[1, 2], [3, 4]]), "non-empty"),
    (dict(ids=[1.5, 2.0]), "integers"),
    (dict(ids=[1, VOCAB]), r"\[0, 96\)"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-1.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(temperature=0.7), "rng"),
    (dict(max_new_tokens=126), "max_position_embeddings=128"),
])
def test_invalid_arguments(gqa_pair, kwargs, match):
  _, model = gqa_pair
  args = dict(ids=[1, 2, 3], max_new_tokens=4) | kwargs
  with pytest.raises(ValueError, match=match):
    models.generate(model, args.pop("ids"), args.pop("max_new_tokens"), **args)


def test_decode_rejects_a_cache_of_the_wrong_depth(gqa_pair):
  _, model = gqa_pair
  with pytest.raises(ValueError, match="cache has 1 layers"):
    model.decode(jnp.zeros((1, 2), jnp.int32), model.init_cache(1, 4)[:1], 0)
  assert isinstance(model.init_cache(1, 4)[0], llama.KVCache)
