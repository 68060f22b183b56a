"""Text generation with a key/value cache: greedy, temperature and top-p (nucleus) sampling.

:func:`generate` runs one jitted program per (prompt bucket, ``max_new_tokens``)
shape: the prompt is right-padded to a power of two (at least 16) and written
into a fixed-size :class:`~models.layers.KVCache` in one prefill pass, then one
token per step in a ``jax.lax.while_loop`` that stops at ``max_new_tokens`` or
at the first id in ``eos_ids``. Padding never influences the result: causal
attention keeps the prompt from seeing it, and every later token overwrites a
padded slot before any query can see that slot.

Batch size is 1 (the prompt of one conversation).

Examples:
  >>> from flax import nnx
  >>> from models import llama
  >>> cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
  ...                         num_layers=2, num_heads=4, num_kv_heads=2)
  >>> model = llama.Llama(cfg, rngs=nnx.Rngs(0))
  >>> out = generate(model, [1, 2, 3], max_new_tokens=5)
  >>> out.shape, out.dtype
  ((5,), dtype('int32'))
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from models import llama

__all__ = ["generate", "sample_token"]

MIN_PROMPT_BUCKET = 16


def sample_token(
    logits: jax.Array,
    key: jax.Array | None,
    temperature: float | jax.Array = 0.0,
    top_p: float | jax.Array = 1.0,
) -> jax.Array:
  """Picks a token id from one row of logits.

  ``temperature == 0`` is greedy (``argmax``; ``key`` unused). Otherwise the
  logits are divided by ``temperature``; with ``top_p < 1`` only the smallest
  set of most likely tokens whose probabilities add up to at least ``top_p``
  is kept (the most likely token always is; tokens tied with the last one kept
  are kept too), and a token is drawn from the renormalised distribution.

  ``temperature`` and ``top_p`` are compared with 0 and 1 in Python, so pass
  Python numbers (a traced value takes the sampling path).

  Args:
    logits: ``[vocab]`` float logits.
    key: a ``jax.random`` key (needed when sampling).
    temperature: 0 for greedy, else the softmax temperature.
    top_p: nucleus mass in ``(0, 1]``.

  Returns:
    An int32 scalar.

  References:
    Holtzman et al., `The Curious Case of Neural Text Degeneration
    <https://arxiv.org/abs/1904.09751>`_, 2020

  Examples:
    >>> import jax, jax.numpy as jnp
    >>> logits = jnp.log(jnp.array([0.1, 0.6, 0.3]))
    >>> int(sample_token(logits, None))
    1
    >>> int(sample_token(logits, jax.random.key(0), temperature=1.0, top_p=0.5))  # only id 1 left
    1
  """
  if isinstance(temperature, (int, float)) and temperature == 0:
    return jnp.argmax(logits).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if not (isinstance(top_p, (int, float)) and top_p >= 1):
    sorted_logits = jnp.sort(logits)[::-1]
    probs = jax.nn.softmax(sorted_logits)
    mass_before = jnp.cumsum(probs) - probs
    keep = jnp.sum(mass_before < top_p)  # >= 1: the first token has mass_before 0
    cutoff = sorted_logits[keep - 1]
    logits = jnp.where(logits >= cutoff, logits, -jnp.inf)
  return jax.random.categorical(key, logits).astype(jnp.int32)


def _prompt_bucket(length: int) -> int:
  return max(MIN_PROMPT_BUCKET, 1 << (length - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "cache_len", "greedy",
                                             "nucleus"))
def _generate(graphdef, state, prompt, prompt_len, eos_ids, temperature, top_p, key, *,
              max_new_tokens, cache_len, greedy, nucleus):
  """The jitted loop; returns ``(tokens [max_new_tokens], count)``."""

  def pick(logits, key):
    if greedy:
      return sample_token(logits, None)
    return sample_token(logits, key, temperature, top_p if nucleus else 1.0)

  model = nnx.merge(graphdef, state)
  cache = model.init_cache(1, cache_len)
  logits, cache = model.decode(prompt[None], cache, 0, logits_at=prompt_len - 1)
  key, sub = jax.random.split(key)
  first = pick(logits[0], sub)
  tokens = jnp.zeros((max_new_tokens,), jnp.int32).at[0].set(first)

  def cond(carry):
    step, _, _, done, _ = carry
    return (step < max_new_tokens) & ~done

  def body(carry):
    step, tokens, cache, _, key = carry
    slot = prompt_len + step - 1  # where the previous token goes
    logits, cache = nnx.merge(graphdef, state).decode(tokens[step - 1][None, None], cache, slot)
    key, sub = jax.random.split(key)
    token = pick(logits[0, 0], sub)
    return step + 1, tokens.at[step].set(token), cache, jnp.any(token == eos_ids), key

  carry = (jnp.int32(1), tokens, cache, jnp.any(first == eos_ids), key)
  count, tokens, _, _, _ = jax.lax.while_loop(cond, body, carry)
  return tokens, count


def generate(
    model: llama.Llama,
    ids: Sequence[int] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_ids: Sequence[int] = (),
    rng: jax.Array | None = None,
) -> np.ndarray:
  """Continues a prompt, greedily or by sampling, with a key/value cache.

  Greedy decoding (the default) picks the most likely token at each step, as
  ``transformers``' ``generate(do_sample=False)`` does; with ``temperature > 0``
  tokens are sampled (see :func:`sample_token` for ``top_p``). Generation stops
  after ``max_new_tokens`` tokens or right after the first token in ``eos_ids``
  (which is included in the result, as in ``transformers``).

  Compiles once per prompt bucket (the prompt length rounded up to a power of
  two, at least 16), ``max_new_tokens``, sampling mode and number of
  ``eos_ids``; the prompt length, ``temperature`` and ``top_p`` values and the
  key are run-time inputs.

  Args:
    model: the :class:`~models.llama.Llama`.
    ids: the prompt's token ids, ``[seq]`` or ``[1, seq]``, at least one.
    max_new_tokens: the most tokens to generate (at least 1). The prompt plus
      these must fit in ``config.max_position_embeddings``.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus sampling mass in ``(0, 1]``; 1 samples from every token.
    eos_ids: ids that end the turn, e.g. a tokenizer's ``stop_ids``.
    rng: a ``jax.random`` key; required when ``temperature > 0``.

  Returns:
    The generated ids (without the prompt), int32 numpy array of length
    between 1 and ``max_new_tokens``.

  Raises:
    ValueError: an empty or too long prompt, or an invalid argument.
  """
  prompt = np.asarray(ids)
  if prompt.ndim == 2 and prompt.shape[0] == 1:
    prompt = prompt[0]
  if prompt.ndim != 1 or prompt.size == 0:
    raise ValueError(f"ids must be a non-empty [seq] or [1, seq] array, got shape {prompt.shape}")
  if not np.issubdtype(prompt.dtype, np.integer):
    raise ValueError(f"ids must be integers, got dtype {prompt.dtype}")
  vocab = model.config.vocab_size
  if prompt.min() < 0 or prompt.max() >= vocab:
    raise ValueError(f"ids must lie in [0, {vocab}), got {prompt.min()}..{prompt.max()}")
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
  if temperature < 0:
    raise ValueError(f"temperature must be >= 0, got {temperature}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p must be in (0, 1], got {top_p}")
  greedy = temperature == 0
  if not greedy and rng is None:
    raise ValueError("sampling (temperature > 0) needs an rng key")
  length = int(prompt.size)
  limit = model.config.max_position_embeddings
  if length + max_new_tokens > limit:
    raise ValueError(f"prompt of {length} tokens plus max_new_tokens={max_new_tokens} exceeds "
                     f"max_position_embeddings={limit}")
  bucket = _prompt_bucket(length)
  padded = np.zeros((bucket,), np.int32)
  padded[:length] = prompt
  graphdef, state = nnx.split(model)
  tokens, count = _generate(
      graphdef, state, jnp.asarray(padded), jnp.int32(length),
      jnp.asarray(np.asarray(eos_ids, np.int32).reshape(-1)),
      jnp.float32(1.0 if greedy else temperature), jnp.float32(top_p),
      jax.random.key(0) if rng is None else rng,
      max_new_tokens=max_new_tokens, cache_len=max(bucket, length + max_new_tokens - 1),
      greedy=greedy, nucleus=top_p < 1)
  return np.asarray(tokens)[:int(count)]
