"""Training configuration: one frozen dataclass and the command line that fills it.

The flag names are part of the public contract (issue 4); every flag maps to one
field of :class:`TrainConfig` with ``-`` replaced by ``_``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from typing import Any, Optional, Sequence

MODELS = ("tiny", "60m", "130m", "350m", "1b", "7b")
OPTIMIZERS = ("adamw", "galore", "natural_galore", "optax_galore")
MESH_AXES = ("data", "fsdp", "tensor")


class ConfigError(ValueError):
  """A bad command-line value; the entry point prints its message, not a traceback."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything a pretraining run depends on.

  Attributes mirror the command-line flags of ``python -m train.pretrain``; run
  it with ``--help`` for their meaning. ``None`` means "use the library or
  derived default" (e.g. ``workdir`` becomes ``runs/<optimizer>-<model>``).
  """

  # Model.
  model: str = "tiny"
  model_overrides: tuple[tuple[str, Any], ...] = ()
  # Data.
  dataset: str = "default"
  tokenizer: Optional[str] = None
  data_dir: Optional[str] = None
  cache_dir: Optional[str] = None
  # Schedule.
  steps: int = 300
  batch_size: int = 8
  seq_len: int = 128
  lr: float = 3e-3
  warmup_steps: int = 30
  final_lr_ratio: float = 0.1
  # Optimizer.
  optimizer: str = "natural_galore"
  rank: int = 64
  update_proj_gap: int = 100
  scale: float = 0.25
  history_size: Optional[int] = None
  damping: Optional[float] = None
  exponent: float = -1.0
  damping_mode: str = "absolute"
  history_dtype: Optional[str] = None
  proj_type: str = "std"
  refresh_policy: Optional[str] = None
  svd_method: str = "exact"
  b1: float = 0.9
  b2: float = 0.999
  weight_decay: float = 0.0
  grad_clip: float = 1.0
  # Evaluation, logging, checkpoints.
  eval_every: int = 100
  eval_batches: int = 8
  log_every: int = 10
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  workdir: Optional[str] = None
  progress: bool = True
  peak_tflops: Optional[float] = None
  stop_at: Optional[int] = None
  # Runtime.
  seed: int = 0
  mesh: Optional[str] = None
  coordinator_address: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  def resolved_workdir(self) -> str:
    """The working directory, ``runs/<optimizer>-<model>`` unless given."""
    return self.workdir or os.path.join("runs", f"{self.optimizer}-{self.model}")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable view (overrides as a dict, workdir resolved)."""
    out = dataclasses.asdict(self)
    out["model_overrides"] = dict(self.model_overrides)
    out["workdir"] = self.resolved_workdir()
    return out

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
  return value


def _non_negative_int(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
  return value


def _non_negative_float(text: str) -> float:
  value = float(text)
  if not value >= 0:
    raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
  return value


def _override(text: str) -> tuple[str, Any]:
  key, sep, value = text.partition("=")
  if not sep or not key:
    raise argparse.ArgumentTypeError(f"expected FIELD=VALUE, got {text!r}")
  try:
    parsed = json.loads(value)
  except json.JSONDecodeError:
    parsed = value
  return key.strip(), parsed


def parse_mesh(spec: Optional[str]) -> dict[str, int]:
  """Parses ``"data=2,fsdp=4"`` into ``{"data": 2, "fsdp": 4}``.

  Args:
    spec: comma-separated ``axis=size`` pairs over ``data``, ``fsdp`` and
      ``tensor``; ``None`` or ``""`` gives ``{}`` (all devices data parallel).

  Returns:
    The axis sizes in the order given.

  Raises:
    ConfigError: on an unknown axis, a repeated axis or a size below 1.

  Examples:
    >>> parse_mesh("data=2,fsdp=4")
    {'data': 2, 'fsdp': 4}
  """
  axes: dict[str, int] = {}
  for part in (spec or "").split(","):
    if not part.strip():
      continue
    name, sep, size = part.partition("=")
    name = name.strip()
    if not sep or name not in MESH_AXES:
      raise ConfigError(
          f"--mesh {spec!r}: expected axis=size pairs over {', '.join(MESH_AXES)},"
          f" e.g. data=2,fsdp=4")
    if name in axes:
      raise ConfigError(f"--mesh {spec!r}: axis {name!r} given twice")
    try:
      axes[name] = int(size)
    except ValueError:
      axes[name] = 0
    if axes[name] < 1:
      raise ConfigError(f"--mesh {spec!r}: size of {name!r} must be a positive integer")
  return axes


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
  """Shows defaults, except empty ones and those the help text already explains."""

  def _get_help_string(self, action):
    if action.default in (None, [], argparse.SUPPRESS) or "default:" in (action.help or ""):
      return action.help
    return super()._get_help_string(action)


_EPILOG = """\
outputs (under --workdir): config.json (resolved flags and model), metrics.jsonl
(one line per logged step; evaluation lines add eval_loss and eval_perplexity),
tensorboard/, checkpoints/ (orbax). Rerunning with the same --workdir resumes
from the newest checkpoint; Ctrl-C saves one and exits.

examples:
  python -m train.pretrain                      # make train: tiny, natural_galore, Shakespeare
  python -m train.pretrain --optimizer adamw --workdir runs/adamw-tiny
  python -m train.pretrain --model 60m --rank 128 --update-proj-gap 200 --lr 0.01 \\
      --steps 10000 --batch-size 512 --seq-len 256 --mesh data=2,fsdp=4
"""


def build_parser() -> argparse.ArgumentParser:
  """The ``python -m train.pretrain`` argument parser (defaults from TrainConfig)."""
  d = TrainConfig()
  p = argparse.ArgumentParser(
      prog="python -m train.pretrain",
      description="Pretrain a LLaMA-style model with AdamW, GaLore or Natural GaLore.",
      epilog=_EPILOG, formatter_class=_HelpFormatter)

  g = p.add_argument_group("model")
  g.add_argument("--model", choices=MODELS, default=d.model,
                 help="model preset from models.llama.CONFIGS (GaLore-paper LLaMA shapes)")
  g.add_argument("--override", dest="model_overrides", action="append", type=_override,
                 default=[], metavar="FIELD=VALUE",
                 help="replace a field of the model config (repeatable; JSON values),"
                      " e.g. num_layers=2")

  g = p.add_argument_group("data")
  g.add_argument("--dataset", default=d.dataset,
                 help="default (Shakespeare; stdlib without network) | stdlib (Python's own"
                      " source) | text:GLOB (.txt/.jsonl files) | tfds:NAME[:CONFIG]")
  g.add_argument("--tokenizer", default=d.tokenizer,
                 help="SentencePiece .model, tokenizer.json or a directory holding one"
                      " (default: Mistral v1, 32k pieces, fetched once from PyPI)")
  g.add_argument("--data-dir", default=d.data_dir, help="tensorflow-datasets data directory")
  g.add_argument("--cache-dir", default=d.cache_dir,
                 help="cache for the tokenizer, corpora and token streams"
                      " (default: $NGALORE_CACHE or ~/.cache/ngalore_jax)")

  g = p.add_argument_group("schedule")
  g.add_argument("--steps", type=_positive_int, default=d.steps, help="total training steps")
  g.add_argument("--batch-size", type=_positive_int, default=d.batch_size,
                 help="global batch size in sequences")
  g.add_argument("--seq-len", type=_positive_int, default=d.seq_len,
                 help="tokens per training sequence")
  g.add_argument("--lr", type=_positive_float, default=d.lr, help="peak learning rate")
  g.add_argument("--warmup-steps", type=_non_negative_int, default=d.warmup_steps,
                 help="linear warm-up steps from 0 to --lr")
  g.add_argument("--final-lr-ratio", type=_non_negative_float, default=d.final_lr_ratio,
                 help="cosine decay ends at lr * this ratio at --steps")

  g = p.add_argument_group("optimizer")
  g.add_argument("--optimizer", choices=OPTIMIZERS, default=d.optimizer,
                 help="optax_galore is optax.contrib.galore, for comparison")
  g.add_argument("--rank", type=_positive_int, default=d.rank,
                 help="GaLore projection rank (at most the model width)")
  g.add_argument("--update-proj-gap", type=_positive_int, default=d.update_proj_gap,
                 help="steps between projector refreshes (SVD of the gradient)")
  g.add_argument("--scale", type=_positive_float, default=d.scale,
                 help="GaLore scale alpha applied to the projected-back update")
  g.add_argument("--history-size", type=_positive_int, default=d.history_size,
                 help="natural_galore: gradients kept for the empirical Fisher"
                      " (default: the library's)")
  g.add_argument("--damping", type=_positive_float, default=d.damping,
                 help="natural_galore: Fisher damping lambda (default: the library's)")
  g.add_argument("--exponent", type=float, default=d.exponent,
                 help="natural_galore: power of the damped Fisher, in [-1, 0); -1 is the paper's "
                      "natural gradient, -0.5 the GGT-style square root")
  g.add_argument("--damping-mode", choices=("absolute", "relative"), default=d.damping_mode,
                 help="natural_galore: damping as given, or times the history's top eigenvalue")
  g.add_argument("--history-dtype", choices=("float32", "bfloat16"), default=d.history_dtype,
                 help="natural_galore: dtype of the stored gradient history (default: the "
                      "gradients')")
  g.add_argument("--proj-type", choices=("std", "reverse_std", "left", "right"),
                 default=d.proj_type,
                 help="galore/natural_galore: which side holds the projector (std: the smaller)")
  g.add_argument("--refresh-policy", choices=("keep", "reset", "rotate"),
                 default=d.refresh_policy,
                 help="galore/natural_galore: what happens to Adam's moments and the history "
                      "when the projector is refreshed (default: the library's)")
  g.add_argument("--svd-method", choices=("exact", "randomized"), default=d.svd_method,
                 help="galore/natural_galore: how projectors are computed")
  g.add_argument("--b1", type=_non_negative_float, default=d.b1, help="Adam beta1")
  g.add_argument("--b2", type=_non_negative_float, default=d.b2, help="Adam beta2")
  g.add_argument("--weight-decay", type=_non_negative_float, default=d.weight_decay,
                 help="decoupled weight decay (never on 1-D norms/biases)")
  g.add_argument("--grad-clip", type=_non_negative_float, default=d.grad_clip,
                 help="clip the global gradient norm before the optimizer; 0 disables")

  g = p.add_argument_group("evaluation, logging and checkpoints")
  g.add_argument("--eval-every", type=_non_negative_int, default=d.eval_every,
                 help="steps between held-out evaluations (0: only at start and end)")
  g.add_argument("--eval-batches", type=_positive_int, default=d.eval_batches,
                 help="held-out batches (of --batch-size) per evaluation")
  g.add_argument("--log-every", type=_positive_int, default=d.log_every,
                 help="steps between metrics.jsonl / TensorBoard lines")
  g.add_argument("--checkpoint-every", type=_non_negative_int, default=d.checkpoint_every,
                 help="steps between async checkpoints (0: only at the end)")
  g.add_argument("--keep-checkpoints", type=_positive_int, default=d.keep_checkpoints,
                 help="keep the last N checkpoints")
  g.add_argument("--workdir", default=d.workdir,
                 help="output directory; a run resumes from its latest checkpoint"
                      " (default: runs/<optimizer>-<model>)")
  g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=d.progress,
                 help="show a tqdm progress bar")
  g.add_argument("--peak-tflops", type=_positive_float, default=d.peak_tflops,
                 help="peak TFLOP/s of all devices together, for MFU (default: a table"
                      " of known accelerators; MFU is omitted on CPU)")
  g.add_argument("--stop-at", type=_positive_int, default=d.stop_at,
                 help="save and stop after this step, as if interrupted (the schedule"
                      " still spans --steps); rerun to resume")

  g = p.add_argument_group("runtime")
  g.add_argument("--seed", type=int, default=d.seed, help="seed for parameters and data order")
  g.add_argument("--mesh", default=d.mesh,
                 help="device mesh, e.g. data=2,fsdp=4 (axes: data, fsdp, tensor);"
                      " default: all devices data parallel")
  g.add_argument("--coordinator-address", default=d.coordinator_address,
                 help="host:port of process 0 for multi-process runs"
                      " (calls jax.distributed.initialize)")
  g.add_argument("--num-processes", type=_positive_int, default=d.num_processes,
                 help="number of processes in a multi-process run")
  g.add_argument("--process-id", type=_non_negative_int, default=d.process_id,
                 help="index of this process in a multi-process run")
  return p


def from_argv(argv: Optional[Sequence[str]] = None) -> TrainConfig:
  """Parses command-line arguments into a :class:`TrainConfig`.

  Args:
    argv: the arguments without the program name; ``None`` reads ``sys.argv``.

  Returns:
    The configuration. Argument-level errors exit through argparse.
  """
  parser = build_parser()
  ns = parser.parse_args(argv)
  values = vars(ns)
  values["model_overrides"] = tuple(values["model_overrides"])
  cfg = TrainConfig(**values)
  try:
    parse_mesh(cfg.mesh)  # fail early on a malformed mesh
  except ConfigError as e:
    parser.error(str(e))
  return cfg


def model_config(config: TrainConfig) -> Any:
  """The ``models.llama`` preset named by ``--model`` with ``--override``s applied.

  Raises:
    ConfigError: for an unknown preset or field, or a value the config rejects.
  """
  from models import llama  # pylint: disable=import-outside-toplevel

  if config.model not in llama.CONFIGS:
    raise ConfigError(f"--model {config.model!r}: unknown; choose from {', '.join(llama.CONFIGS)}")
  base = llama.CONFIGS[config.model]
  fields = {f.name for f in dataclasses.fields(base)}
  overrides = dict(config.model_overrides)
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"--override {unknown[0]}: not a field of the model config;"
                      f" fields: {', '.join(sorted(fields))}")
  try:
    return dataclasses.replace(base, **overrides)
  except (TypeError, ValueError) as e:
    raise ConfigError(f"--override: {e}") from e


def validate(config: TrainConfig, model_cfg: Any) -> None:
  """Checks the flags against each other and against the model.

  Raises:
    ConfigError: naming the flag, e.g. a rank above the model width or a
      sequence longer than the model's maximum positions.
  """
  if config.optimizer != "adamw" and config.rank > model_cfg.hidden_size:
    raise ConfigError(f"--rank {config.rank} exceeds the model width"
                      f" (hidden_size {model_cfg.hidden_size} for --model {config.model})")
  if config.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"--seq-len {config.seq_len} exceeds the maximum positions of --model"
                      f" {config.model} ({model_cfg.max_position_embeddings})")
  if config.warmup_steps >= config.steps:
    raise ConfigError(f"--warmup-steps {config.warmup_steps} must be below --steps {config.steps}")
  if not 0 <= config.b1 < 1 or not 0 <= config.b2 < 1:
    raise ConfigError("--b1 and --b2 must lie in [0, 1)")
  if not -1.0 <= config.exponent < 0.0:
    raise ConfigError(f"--exponent {config.exponent} must lie in [-1, 0)")
  if config.stop_at is not None and config.stop_at > config.steps:
    raise ConfigError(f"--stop-at {config.stop_at} is after --steps {config.steps}")
  if (config.coordinator_address is None) != (config.num_processes is None):
    raise ConfigError("--coordinator-address and --num-processes go together")
