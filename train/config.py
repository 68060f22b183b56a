"""Training configuration: one frozen dataclass and the command line that fills it.

The flag names are part of the public contract (issue 4); every flag maps to one
field of :class:`TrainConfig` with ``-`` replaced by ``_``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
from typing import Any, Optional, Sequence

from train import optimizers
from train.optimizers import OptimizerConfig

MODELS = ("tiny", "60m", "130m", "350m", "1b", "7b")
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
  # Optimizer: which one and its options (train.optimizers), then clipping in front of it.
  optimizer: OptimizerConfig = optimizers.NaturalGaLoreConfig()
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
    return self.workdir or os.path.join("runs", f"{self.optimizer.name}-{self.model}")

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable view (overrides as a dict, optimizer as ``{"name": ..., options}``,
    workdir resolved)."""
    out = dataclasses.asdict(self)
    out["model_overrides"] = dict(self.model_overrides)
    out["optimizer"] = {"name": self.optimizer.name, **self.optimizer.options()}
    out["workdir"] = self.resolved_workdir()
    return out

  @classmethod
  def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
    """The inverse of :meth:`to_dict` (unknown keys are ignored, missing ones take defaults).

    Raises:
      ValueError: the optimizer is not registered.

    Examples:
      >>> config = TrainConfig(optimizer=optimizers.make("galore", rank=8), steps=10)
      >>> TrainConfig.from_dict(config.to_dict()) == dataclasses.replace(
      ...     config, workdir=config.resolved_workdir())
      True
    """
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in values.items() if k in fields and k != "optimizer"}
    if "model_overrides" in kwargs:
      kwargs["model_overrides"] = tuple(dict(kwargs["model_overrides"]).items())
    saved = values.get("optimizer")
    if saved is not None:
      # Older runs stored the optimizer's name with its options flat beside the other fields.
      options = dict(values) if isinstance(saved, str) else dict(saved)
      name = saved if isinstance(saved, str) else options.pop("name")
      known = {f.name for f in dataclasses.fields(optimizers.REGISTRY[name])}
      kwargs["optimizer"] = optimizers.make(
          name, **{k: v for k, v in options.items() if k in known})
    return cls(**kwargs)

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
  if not (math.isfinite(value) and value > 0):
    raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
  return value


def _non_negative_float(text: str) -> float:
  value = float(text)
  if not (math.isfinite(value) and value >= 0):
    raise argparse.ArgumentTypeError(f"must be finite and >= 0, got {text}")
  return value


# How an optimizer option's text is parsed: floats must be finite (the library checks ranges).
_OPTION_TYPES = {int: int, float: lambda text: _finite_float(text), str: str}


def _finite_float(text: str) -> float:
  value = float(text)
  if not math.isfinite(value):
    raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
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
from the newest checkpoint; Ctrl-C or SIGTERM saves the step in flight and exits
(130 / 143); divergence stops the run (exit 1).

examples:
  python -m train.pretrain                      # make train: tiny, natural_galore, Shakespeare
  python -m train.pretrain --optimizer adamw --workdir runs/adamw-tiny
  python -m train.pretrain --model 60m --rank 128 --update-proj-gap 200 --lr 0.01 \\
      --steps 10000 --batch-size 512 --seq-len 256 --mesh data=2,fsdp=4
  # two hosts, 10.0.0.1 and another: the same command on each, with its own --process-id
  python -m train.pretrain --workdir /shared/run --coordinator-address 10.0.0.1:1234 \\
      --num-processes 2 --process-id 0          # on 10.0.0.1; --process-id 1 on the other
"""


_MULTI_PROCESS_HELP = """\
Multi-process (multi-host) runs: start the same command once per host, adding
--coordinator-address HOST0:PORT --num-processes N --process-id I (I = 0 on
HOST0, whose PORT must be free; 1 .. N-1 elsewhere). Under SLURM or Open MPI
leave the three out: jax.distributed finds them. The mesh spans every host's
devices (--mesh must use all of them); CPU hosts talk through gloo. Each
process reads only its own rows of each global batch (the rows its devices
hold), so N processes train as one process with the same mesh, to the same
losses. --workdir must be one directory every host sees: orbax writes each
checkpoint once, the processes together, and every process resumes from it;
process 0 alone writes config.json, metrics.jsonl and TensorBoard. Ctrl-C and
SIGTERM act on one process (the others then wait for it): plan the end with
--stop-at, or kill every process and rerun to resume from the newest
checkpoint."""


def check_distributed(config: Any) -> None:
  """Checks the multi-process flags against each other.

  Raises:
    ConfigError: naming the flag that is missing or out of range, e.g. ``--process-id`` without
      ``--coordinator-address``, or ``--process-id 2`` with ``--num-processes 2``.

  Examples:
    >>> check_distributed(TrainConfig(coordinator_address="10.0.0.1:1234", num_processes=2,
    ...                               process_id=1))
  """
  address, count, index = config.coordinator_address, config.num_processes, config.process_id
  if address is None:
    given = [flag for flag, value in (("--num-processes", count), ("--process-id", index))
             if value is not None]
    if given:
      raise ConfigError(f"{given[0]} needs --coordinator-address HOST:PORT")
    return
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ConfigError(f"--coordinator-address {address!r}: expected HOST:PORT, e.g."
                      " 10.0.0.1:1234")
  if count is None:
    raise ConfigError("--coordinator-address needs --num-processes")
  if index is None:
    raise ConfigError("--coordinator-address needs --process-id")
  if index >= count:
    raise ConfigError(f"--process-id {index} must be below --num-processes {count}")


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
                      " source) | text:GLOB (.txt files, .jsonl files with a \"text\" field;"
                      " 5%% of the documents are held out, or the last 5%% of the text when it"
                      " is a single one, e.g. text:input.txt) | tfds:NAME[:CONFIG]")
  g.add_argument("--tokenizer", default=d.tokenizer,
                 help="SentencePiece .model, tokenizer.json or a directory holding one"
                      " (default: Mistral v1, 32k pieces, fetched once from PyPI)")
  g.add_argument("--data-dir", default=d.data_dir, help="tensorflow-datasets data directory")
  g.add_argument("--cache-dir", default=d.cache_dir,
                 help="cache for the tokenizer, corpora and token streams"
                      " (default: $NGALORE_CACHE or ~/.cache/ngalore_jax)")
  add_common_arguments(p, d)
  return p


def add_common_arguments(p: argparse.ArgumentParser, d: TrainConfig) -> None:
  """The flags every training entry point shares: schedule, optimizer (generated from
  :data:`train.optimizers.REGISTRY`), evaluation, logging, checkpoints and runtime.

  Args:
    p: the parser to add them to.
    d: the configuration whose values are the defaults.
  """
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

  g = p.add_argument_group(
      "optimizer", "--optimizer picks one of train.optimizers.REGISTRY; the options below are "
      "its fields (each says which optimizers take it; unset: that optimizer's default)")
  g.add_argument("--optimizer", choices=tuple(optimizers.REGISTRY), default=d.optimizer.name,
                 help="; ".join(f"{name}: {cls.description}"
                                for name, cls in optimizers.REGISTRY.items()))
  for name, (field, defaults) in optimizers.option_fields().items():
    meta = field.metadata
    by_default: dict[str, list[str]] = {}
    for user, value in defaults.items():
      by_default.setdefault("the library's" if value is None else str(value), []).append(user)
    if len(by_default) == 1:
      (text,) = by_default
      users = "all" if len(defaults) == len(optimizers.REGISTRY) else ", ".join(defaults)
      described = f"{users}; default: {text}"
    else:
      described = "default: " + "; ".join(f"{text} ({', '.join(users)})"
                                          for text, users in by_default.items())
    g.add_argument("--" + name.replace("_", "-"), dest=name, default=None,
                   type=_OPTION_TYPES[meta["type"]], choices=meta["choices"],
                   metavar=None if meta["choices"] else name.upper(),
                   help=f"{meta['help']} ({described})")
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

  g = p.add_argument_group("runtime", _MULTI_PROCESS_HELP)
  g.add_argument("--seed", type=int, default=d.seed, help="seed for parameters and data order")
  g.add_argument("--mesh", default=d.mesh,
                 help="device mesh, e.g. data=2,fsdp=4 (axes: data, fsdp, tensor);"
                      " default: all devices data parallel")
  g.add_argument("--coordinator-address", default=d.coordinator_address, metavar="HOST:PORT",
                 help="multi-process run: process 0's host and a free port on it, the same in"
                      " every process (calls jax.distributed.initialize; needs --num-processes"
                      " and --process-id)")
  g.add_argument("--num-processes", type=_positive_int, default=d.num_processes,
                 help="multi-process run: how many processes (one per host)")
  g.add_argument("--process-id", type=_non_negative_int, default=d.process_id,
                 help="multi-process run: this process's index, 0 to --num-processes - 1;"
                      " 0 writes config.json, metrics.jsonl and TensorBoard")


def from_argv(argv: Optional[Sequence[str]] = None, *,
              parser: Optional[argparse.ArgumentParser] = None,
              config_cls: type = TrainConfig) -> Any:
  """Parses command-line arguments into a :class:`TrainConfig`.

  Args:
    argv: the arguments without the program name; ``None`` reads ``sys.argv``.
    parser: the entry point's parser (default: :func:`build_parser`, pretraining's); its
      destinations are ``config_cls``'s fields.
    config_cls: :class:`TrainConfig` or a subclass with the entry point's own fields.

  Returns:
    The configuration. Argument-level errors exit through argparse.
  """
  parser = parser or build_parser()
  ns = parser.parse_args(argv)
  values = vars(ns)
  if "model_overrides" in values:
    values["model_overrides"] = tuple(values["model_overrides"])
  name = values.pop("optimizer")
  taken = {f.name for f in dataclasses.fields(optimizers.REGISTRY[name])}
  given = {k: values.pop(k) for k in optimizers.option_fields()}
  given = {k: v for k, v in given.items() if v is not None}
  ignored = sorted(set(given) - taken)
  if ignored:
    logging.getLogger(__name__).warning(
        "--optimizer %s ignores %s", name, ", ".join("--" + k.replace("_", "-") for k in ignored))
  cfg = config_cls(optimizer=optimizers.make(
      name, **{k: v for k, v in given.items() if k in taken}), **values)
  try:
    parse_mesh(cfg.mesh)  # fail early on a malformed mesh
    check_distributed(cfg)  # before jax.distributed.initialize waits for the other processes
  except ConfigError as e:
    parser.error(str(e))
  return cfg


def model_config(config: TrainConfig, base: Any = None) -> Any:
  """The ``models.llama`` preset named by ``--model`` with ``--override``s applied.

  Args:
    config: the run configuration.
    base: the model config to override instead of the ``--model`` preset (e.g. a pretrained
      model's).

  Raises:
    ConfigError: for an unknown preset or field, or a value the config rejects.
  """
  from models import llama  # pylint: disable=import-outside-toplevel

  if base is None:
    if config.model not in llama.CONFIGS:
      raise ConfigError(
          f"--model {config.model!r}: unknown; choose from {', '.join(llama.CONFIGS)}")
    base = llama.CONFIGS[config.model]
  fields = {f.name for f in dataclasses.fields(base)}
  overrides = dict(config.model_overrides)
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ConfigError(f"--override {unknown[0]}: not a field of the model config;"
                      f" fields: {', '.join(sorted(fields))}")
  import typing  # pylint: disable=import-outside-toplevel
  hints = typing.get_type_hints(type(base))
  descriptions = {bool: "true or false", int: "an integer", float: "a finite number",
                  str: "a string"}

  def typed(name: str, value: Any) -> Any:
    """``value`` as the field's type (int, float, bool, str, optionally None; Any as is)."""
    args = typing.get_args(hints.get(name, Any))
    optional = type(None) in args
    kinds = [a for a in args if a is not type(None)] or [hints.get(name, Any)]
    kind = kinds[0] if len(kinds) == 1 else Any
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
      value = value.lower() == "true"
    if value is None and optional or kind is Any:
      return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and (
        math.isfinite(value)):
      return float(value)
    if kind in (bool, int, str) and type(value) is kind:  # bool is an int: compare exactly
      return value
    shown = value if isinstance(value, str) else json.dumps(value)
    raise ConfigError(f"--override {name}={shown}: {name} takes "
                      f"{descriptions.get(kind, kind)}{' or null' if optional else ''}")

  overrides = {name: typed(name, value) for name, value in overrides.items()}
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
  try:
    config.optimizer.validate(model_cfg)
  except ValueError as e:
    raise ConfigError(f"{optimizers.flag_message(str(e))} for --model {config.model}") from e
  if config.seq_len > model_cfg.max_position_embeddings:
    raise ConfigError(f"--seq-len {config.seq_len} exceeds the maximum positions of --model"
                      f" {config.model} ({model_cfg.max_position_embeddings})")
  if config.warmup_steps >= config.steps:
    raise ConfigError(f"--warmup-steps {config.warmup_steps} must be below --steps {config.steps}")
  if config.stop_at is not None and config.stop_at > config.steps:
    raise ConfigError(f"--stop-at {config.stop_at} is after --steps {config.steps}")
  check_distributed(config)
