"""Token data for the trainer: tokenised once, cached, packed, read by random access.

A split's documents (see :mod:`train.corpus`) are tokenised, each followed by the tokenizer's EOS,
and concatenated into one token stream, cached as a ``.npy`` file under
``<cache>/tokens/`` keyed by a hash of the corpus, the split, the tokenizer file and the token cap.
The stream is cut into non-overlapping sequences of ``seq_len + 1`` tokens (the tail that does not
fill one is dropped); a batch row ``b`` gives inputs ``b[:-1]`` and targets ``b[1:]``.

Training batches walk the sequences epoch by epoch, each epoch in its own permutation drawn from
``(seed, epoch)``. Batch ``step`` is a pure function of ``(seed, step)``, so resuming at any step
needs no iterator state, and in a multi-process run every process reads just its own rows of each
global batch (:func:`local_rows`) from the same order, with no communication.

Examples:
  >>> from train import data
  >>> tok = data.load_tokenizer()  # doctest: +SKIP
  >>> ds = data.load_dataset("default", seq_len=256, tokenizer=tok)  # doctest: +SKIP
  >>> ds.batch(step=0, batch_size=8, seed=0).shape  # doctest: +SKIP
  (8, 257)
"""

import json
import os
import pathlib
import re
import time

import numpy as np

from train import corpus as corpus_lib
from train import fetch
from train.tokenizer import load_tokenizer  # Re-exported: data.load_tokenizer(...).

__all__ = ["PackedDataset", "load_dataset", "load_tokenizer", "local_rows", "tokenize_split"]

CACHE_FORMAT = 1  # Bump when the token stream's layout changes.
_ENCODE_CHUNK_CHARS = 1 << 22  # Documents are tokenised in batches of about 4 M characters.
_PERMUTATION_CACHE = 4


class PackedDataset:
  """A token stream cut into sequences of ``seq_len + 1`` tokens.

  Attributes:
    tokens: the split's token stream (1-D, possibly memory-mapped).
    seq_len: model sequence length; each packed sequence holds ``seq_len + 1`` tokens.
    num_tokens: length of the token stream.
    num_sequences: number of packed sequences, ``num_tokens // (seq_len + 1)``.
    name: what the stream is, for :meth:`describe`.
  """

  def __init__(self, tokens: np.ndarray, *, seq_len: int, name: str = "tokens"):
    """Packs a token stream.

    Args:
      tokens: a 1-D array of token ids.
      seq_len: the model's sequence length, at least 1.
      name: a description of the stream for :meth:`describe`.

    Raises:
      ValueError: ``seq_len + 1`` exceeds the number of tokens.
    """
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
      raise ValueError(f"seq_len must be a positive integer, got {seq_len!r}")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1:
      raise ValueError(f"tokens must be 1-D, got shape {tokens.shape}")
    self.tokens = tokens
    self.seq_len = int(seq_len)
    self.num_tokens = int(tokens.shape[0])
    self.num_sequences = self.num_tokens // (self.seq_len + 1)
    self.name = name
    if self.num_sequences == 0:
      raise ValueError(f"{name} has {self.num_tokens:,} tokens, fewer than seq_len + 1 = "
                       f"{self.seq_len + 1:,}: use a shorter seq_len or more data")
    self._rows = tokens[:self.num_sequences * (self.seq_len + 1)].reshape(
        self.num_sequences, self.seq_len + 1)
    self._permutations = {}

  def describe(self) -> str:
    """Returns one line for logs."""
    return (f"{self.name}: {self.num_tokens:,} tokens, {self.num_sequences:,} sequences of "
            f"{self.seq_len}+1")

  def sequences(self, indices) -> np.ndarray:
    """Returns the packed sequences at ``indices`` as int32 ``[len(indices), seq_len + 1]``."""
    return np.asarray(self._rows[np.asarray(indices, dtype=np.int64)], dtype=np.int32)

  def permutation(self, seed: int, epoch: int) -> np.ndarray:
    """Returns the order in which epoch ``epoch`` visits the sequences under ``seed``."""
    key = (int(seed), int(epoch))
    if key not in self._permutations:
      if len(self._permutations) >= _PERMUTATION_CACHE:
        self._permutations.pop(next(iter(self._permutations)))
      entropy = [int(seed) % 2**64, int(epoch)]
      rng = np.random.default_rng(np.random.SeedSequence(entropy))
      self._permutations[key] = rng.permutation(self.num_sequences)
    return self._permutations[key]

  def batch_indices(self, step: int, batch_size: int, seed: int) -> np.ndarray:
    """Returns the sequence indices of training batch ``step`` (see :meth:`batch`)."""
    if step < 0 or batch_size < 1:
      raise ValueError(f"need step >= 0 and batch_size >= 1, got step={step}, "
                       f"batch_size={batch_size}")
    positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
    epochs, offsets = np.divmod(positions, self.num_sequences)
    indices = np.empty_like(positions)
    for epoch in np.unique(epochs):
      where = epochs == epoch
      indices[where] = self.permutation(seed, int(epoch))[offsets[where]]
    return indices

  def batch(self, step: int, batch_size: int, seed: int, rows=None) -> np.ndarray:
    """Returns training batch ``step``: int32 ``[batch_size, seq_len + 1]``, or some of its rows.

    Rows ``step * batch_size`` to ``(step + 1) * batch_size - 1`` of the endless walk through
    the sequences, epoch ``e`` in the permutation drawn from ``(seed, e)``: one epoch visits every
    sequence exactly once. The result depends only on ``(seed, step, batch_size)``.

    Args:
      step: the training step, from 0.
      batch_size: rows per batch (the global batch, over all processes).
      seed: the data seed.
      rows: which rows of the global batch to read (e.g. a process's :func:`local_rows`);
        ``None`` reads all of them. Only those sequences are read.

    Returns:
      The batch's rows ``rows``, in that order; inputs are ``b[:, :-1]``, targets ``b[:, 1:]``.
    """
    indices = self.batch_indices(step, batch_size, seed)
    return self.sequences(indices if rows is None else indices[np.asarray(rows)])

  def eval_batches(self, batch_size: int, num_batches: int) -> list[np.ndarray]:
    """Returns fixed evaluation batches: the split's first sequences, in order.

    Args:
      batch_size: rows per batch.
      num_batches: the number of batches wanted; fewer come back when the split does not hold
        ``num_batches * batch_size`` sequences.

    Returns:
      A list of int32 ``[batch_size, seq_len + 1]`` arrays, the same on every call.

    Raises:
      ValueError: the split does not fill a single batch.
    """
    if batch_size < 1 or num_batches < 1:
      raise ValueError(f"need batch_size >= 1 and num_batches >= 1, got {batch_size}, "
                       f"{num_batches}")
    available = self.num_sequences // batch_size
    if available == 0:
      raise ValueError(f"{self.name} has {self.num_sequences} sequences of {self.seq_len}+1 "
                       f"tokens, fewer than one evaluation batch of {batch_size}")
    return [self.sequences(np.arange(i * batch_size, (i + 1) * batch_size))
            for i in range(min(num_batches, available))]


def local_rows(row_slices, batch_size: int) -> np.ndarray:
  """The rows of a global batch that one process reads: those its devices hold, each once.

  In a multi-process run every process feeds only its own rows of each global batch (see
  ``jax.make_array_from_process_local_data``); the processes' rows are disjoint unless the mesh
  replicates the batch across processes (a ``tensor`` axis spanning them), and together they
  are the whole batch.

  Args:
    row_slices: the batch-dimension slice of each of the process's devices (from
      ``sharding.addressable_devices_indices_map(shape)``); devices holding the same rows repeat.
    batch_size: the global batch size.

  Returns:
    The sorted distinct row positions, int64.

  Examples:
    >>> local_rows([slice(4, 6), slice(6, 8)], 8)
    array([4, 5, 6, 7])
    >>> local_rows([slice(None), slice(None)], 4)  # a batch replicated on both devices
    array([0, 1, 2, 3])
  """
  held = np.zeros(batch_size, dtype=bool)
  for rows in row_slices:
    held[rows] = True
  return np.flatnonzero(held)


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.int32)


def tokenize_split(corpus: corpus_lib.Corpus, split: str, tokenizer, *,
                   max_tokens: int | None = None) -> tuple[np.ndarray, int]:
  """Tokenises a split: each document's ids followed by EOS, concatenated.

  Args:
    corpus: the corpus.
    split: "train" or "validation".
    tokenizer: an object with ``encode`` (and optionally ``encode_batch``), ``eos_id`` and
      ``vocab_size``.
    max_tokens: stop once the stream holds this many tokens (the stream is cut there).

  Returns:
    ``(tokens, num_documents)``: the stream (uint16 when the vocabulary allows) and how many
    documents went into it.
  """
  dtype = _token_dtype(tokenizer.vocab_size)
  encode_batch = getattr(tokenizer, "encode_batch", None) or (
      lambda texts: [tokenizer.encode(t) for t in texts])
  eos = int(tokenizer.eos_id)
  pieces, num_tokens, num_documents = [], 0, 0

  def flush(texts):
    nonlocal num_tokens
    for ids in encode_batch(texts):
      ids = np.asarray(list(ids) + [eos], dtype=np.int64)
      if ids.min() < 0 or ids.max() > np.iinfo(dtype).max:
        raise ValueError(f"tokenizer produced id {ids.max()} outside its vocabulary")
      pieces.append(ids.astype(dtype))
      num_tokens += ids.size

  texts, chars = [], 0
  for document in corpus.documents(split):
    if max_tokens is not None and num_tokens >= max_tokens:
      break
    texts.append(document.text)
    chars += len(document.text)
    num_documents += 1
    if chars >= _ENCODE_CHUNK_CHARS:
      flush(texts)
      texts, chars = [], 0
  if texts and (max_tokens is None or num_tokens < max_tokens):
    flush(texts)
  tokens = np.concatenate(pieces) if pieces else np.zeros((0,), dtype)
  if max_tokens is not None:
    tokens = tokens[:max_tokens]
  return tokens, num_documents


def _cache_paths(cache_dir, corpus, split, tokenizer, max_tokens) -> tuple[pathlib.Path, ...]:
  key = json.dumps([CACHE_FORMAT, corpus.fingerprint, split, tokenizer.fingerprint, max_tokens])
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", corpus.name)[:60]
  base = f"{stem}-{split}-{fetch.sha256_bytes(key.encode())[:20]}"
  directory = fetch.resolve_cache_dir(cache_dir) / "tokens"
  return directory / f"{base}.npy", directory / f"{base}.json"


def _save_npy(path: pathlib.Path, array: np.ndarray) -> None:
  with fetch.atomic_writer(path) as f:
    np.save(f, array)


def cached_tokens(corpus: corpus_lib.Corpus, split: str, tokenizer, *,
                  cache_dir: str | os.PathLike | None = None,
                  max_tokens: int | None = None) -> tuple[np.ndarray, dict]:
  """Returns a split's token stream from the cache, tokenising it on the first call.

  A tokenizer without a ``fingerprint`` attribute is not cached: its stream is computed each time.

  Args:
    corpus: the corpus.
    split: "train" or "validation".
    tokenizer: see :func:`tokenize_split`.
    cache_dir: the cache directory.
    max_tokens: see :func:`tokenize_split`; part of the cache key.

  Returns:
    ``(tokens, info)``: the stream (memory-mapped when cached) and a dict with ``num_documents``,
    ``num_tokens`` and ``seconds`` (time spent tokenising, 0 on a cache hit).
  """
  if getattr(tokenizer, "fingerprint", None) is None:
    start = time.perf_counter()
    tokens, num_documents = tokenize_split(corpus, split, tokenizer, max_tokens=max_tokens)
    return tokens, {"num_documents": num_documents, "num_tokens": int(tokens.size),
                    "seconds": time.perf_counter() - start}
  npy, meta = _cache_paths(cache_dir, corpus, split, tokenizer, max_tokens)
  if npy.is_file() and meta.is_file():
    info = json.loads(meta.read_text())
    tokens = np.load(npy, mmap_mode="r")
    if tokens.ndim == 1 and tokens.size == info.get("num_tokens"):
      return tokens, {**info, "seconds": 0.0}
  start = time.perf_counter()
  tokens, num_documents = tokenize_split(corpus, split, tokenizer, max_tokens=max_tokens)
  info = {"corpus": corpus.name, "split": split, "tokenizer": getattr(tokenizer, "name", "?"),
          "num_documents": num_documents, "num_tokens": int(tokens.size)}
  npy.parent.mkdir(parents=True, exist_ok=True)
  _save_npy(npy, tokens)
  fetch.write_atomic(meta, json.dumps(info, indent=1).encode())
  return tokens, {**info, "seconds": time.perf_counter() - start}


def load_dataset(spec: str, *, split: str = "train", seq_len: int, tokenizer,
                 cache_dir: str | os.PathLike | None = None,
                 data_dir: str | os.PathLike | None = None,
                 max_tokens: int | None = None) -> PackedDataset:
  """Loads a split of a dataset as packed sequences.

  Args:
    spec: ``"default"`` (Shakespeare, falling back to ``stdlib`` without network), ``"stdlib"``,
      ``"text:GLOB"`` or ``"tfds:NAME[:CONFIG]"``; see :mod:`train.corpus`.
    split: ``"train"`` or ``"validation"``; the two never share a document.
    seq_len: the model's sequence length; sequences hold ``seq_len + 1`` tokens.
    tokenizer: from :func:`load_tokenizer`.
    cache_dir: the cache directory (``$NGALORE_CACHE`` or ``~/.cache/ngalore_jax`` if ``None``).
    data_dir: the tensorflow-datasets data directory, for ``tfds:``.
    max_tokens: read only this many tokens of the split (for corpora as big as C4).

  Returns:
    The packed split.

  Raises:
    ValueError: a bad spec, split or seq_len, an empty split, or too few tokens for one sequence.
    FileNotFoundError: the data (or the default corpus's download) is missing.
  """
  corpus_lib.check_split(split)
  if max_tokens is not None and max_tokens < 1:
    raise ValueError(f"max_tokens must be positive, got {max_tokens}")
  corpus = corpus_lib.open_corpus(spec, cache_dir=cache_dir, data_dir=data_dir)
  tokens, info = cached_tokens(corpus, split, tokenizer, cache_dir=cache_dir,
                               max_tokens=max_tokens)
  if info["num_documents"] == 0:
    raise ValueError(f"the {split} split of {spec} ({corpus.name}) has no documents"
                     + (": the text is too short to hold part of it out"
                        if split == "validation" else ""))
  name = (f"{spec} [{corpus.name}] {split} ({info['num_documents']:,} documents, tokenizer "
          f"{getattr(tokenizer, 'name', type(tokenizer).__name__)})")
  return PackedDataset(tokens, seq_len=seq_len, name=name)
