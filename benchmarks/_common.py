"""Pieces shared by the speed and convergence benchmarks.

* :func:`build_optimizer`: the optimizers compared, each ``chain(clip_by_global_norm, <opt>)``
  built through the trainer's optimizer registry (:mod:`train.optimizers`), never a second
  builder.
* :func:`make_lr_step`: a jitted train step whose peak learning rate is a run-time argument, so
  one compilation serves a whole learning-rate sweep and every seed.
* :func:`train_bpe_tokenizer`: a small byte-level BPE tokenizer trained on the TRAIN split only,
  cached as a ``tokenizer.json`` (``train.data.load_tokenizer`` reads it).
* Timing (:func:`time_call`), results files written atomically (:func:`update_json`), and a
  description of the machine (:func:`machine_info`).
* For the fine-tuning benchmarks' command lines and tables: :func:`parse_lrs`, :func:`mean_std`,
  :func:`markdown_table`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import pathlib
import platform
import statistics
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import optax

from train import fetch
from train import optimizers as train_optimizers

RESULTS_DIR = pathlib.Path(__file__).resolve().parent / "results"

def enable_compilation_cache(cache_dir: Optional[str] = None) -> None:
  """Persists XLA executables under ``<cache>/benchmarks/xla`` so reruns skip compiling."""
  path = fetch.resolve_cache_dir(cache_dir) / "benchmarks" / "xla"
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def warmup_cosine(steps: int, warmup_steps: int, final_lr_ratio: float = 0.1) -> optax.Schedule:
  """Warm-up to 1 then cosine decay to ``final_lr_ratio``: multiply by the peak lr yourself."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=1.0, warmup_steps=warmup_steps, decay_steps=steps,
      end_value=final_lr_ratio)


def build_optimizer(name: str, learning_rate: optax.ScalarOrSchedule, *, grad_clip: float = 1.0,
                    **options: Any) -> optax.GradientTransformation:
  """The trainer's optimizer ``name`` (:data:`train.optimizers.REGISTRY`), clipping in front.

  Built exactly as ``python -m train.pretrain --optimizer NAME`` builds it (same masks: GaLore
  projects the attention and MLP kernels, weight decay skips 1-D leaves).

  Args:
    name: a registered optimizer (``adamw``, ``galore``, ``natural_galore``, ``optax_galore``,
      ...).
    learning_rate: a float or schedule.
    grad_clip: global-norm clipping of the full gradient (0 disables it).
    **options: fields of the optimizer's config (``rank``, ``update_proj_gap``,
      ``history_size``, ``proj_type``, ...); an option it does not take is a ``ValueError``.

  Returns:
    An ``optax.GradientTransformation`` for the parameters of :mod:`models.llama`.
  """
  config = train_optimizers.make(name, **options)
  return train_optimizers.with_clipping(config.build(learning_rate), grad_clip)


def taken_options(name: str, **candidates: Any) -> dict[str, Any]:
  """The ``candidates`` that optimizer ``name`` takes (e.g. a shared rank, not for AdamW).

  Examples:
    >>> taken_options("adamw", rank=8, b1=0.8)
    {'b1': 0.8}
  """
  fields = {f.name for f in dataclasses.fields(train_optimizers.REGISTRY[name])}
  return {k: v for k, v in candidates.items() if k in fields}


def make_lr_step(graphdef: Any, tx: optax.GradientTransformation,
                 schedule: optax.Schedule, parametrization: Any = None) -> Callable:
  """The trainer's train step, jitted, with the peak learning rate as a run-time argument.

  ``(state, batch, lr) -> (state, metrics)`` over :class:`train.steps.TrainState`. ``tx`` must be
  built on ``schedule``, which peaks at 1 (:func:`warmup_cosine`): every optimizer here ends in
  ``scale_by_learning_rate``, so multiplying its update by ``lr`` is exactly the optimizer built
  with peak ``lr``, and a change of ``lr`` (or of the initial parameters) does not recompile.
  ``parametrization`` is the optimizer's held-tree parametrisation (LoRA, ReLoRA, low-rank
  factors; ``OptimizerConfig.parametrization()``), as in :func:`train.steps.make_train_step`.
  """
  from train import steps  # pylint: disable=import-outside-toplevel
  return jax.jit(steps.make_train_step(graphdef, tx, schedule, parametrization=parametrization),
                 donate_argnums=0)


def make_eval_loss(graphdef: Any) -> Callable:
  """A jitted ``(params, batch) -> loss``."""
  from train import steps  # pylint: disable=import-outside-toplevel
  return jax.jit(lambda params, batch: steps.cross_entropy(graphdef, params, batch))


def train_bpe_tokenizer(vocab_size: int, *, dataset: str = "default",
                        cache_dir: Optional[str] = None) -> pathlib.Path:
  """A byte-level BPE ``tokenizer.json`` trained on ``dataset``'s TRAIN split, cached.

  The validation split is never seen, so held-out losses are honest. ``</s>`` (id 0) is the
  end-of-text token that :mod:`train.data` puts between documents.

  Args:
    vocab_size: vocabulary size, the 256 byte symbols and ``</s>`` included.
    dataset: a ``train.data.load_dataset`` spec.
    cache_dir: the cache directory (default ``$NGALORE_CACHE`` or ``~/.cache/ngalore_jax``).

  Returns:
    The path of ``<cache>/benchmarks/bpe-<dataset>-<vocab_size>.json``.
  """
  import tokenizers  # pylint: disable=import-outside-toplevel
  from tokenizers import decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  from train import corpus as corpus_lib  # pylint: disable=import-outside-toplevel

  safe = "".join(c if c.isalnum() else "_" for c in dataset)[:40]
  path = fetch.resolve_cache_dir(cache_dir) / "benchmarks" / f"bpe-{safe}-{vocab_size}.json"
  if path.is_file():
    return path
  corpus = corpus_lib.open_corpus(dataset, cache_dir=cache_dir)
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["</s>"],
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator((d.text for d in corpus.documents("train")), trainer=trainer)
  fetch.write_atomic(path, tok.to_str().encode())
  return path


def time_call(fn: Callable[[], Any], repeats: int) -> list[float]:
  """Wall seconds of ``repeats`` calls of ``fn``, each waited for with ``block_until_ready``."""
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return times


def median(values) -> float:
  return float(statistics.median(values))


def code_version() -> str:
  """``git`` HEAD of the repository, with ``+dirty`` if ``ngalore_jax``/``models``/``train`` differ."""
  import subprocess  # pylint: disable=import-outside-toplevel
  root = pathlib.Path(__file__).resolve().parent.parent
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", "ngalore_jax", "models",
                            "train"], cwd=root, check=False).returncode != 0
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def machine_info() -> dict[str, Any]:
  """CPU model, cores, load average and library versions, for the results files."""
  cpu = platform.processor() or platform.machine()
  with contextlib.suppress(OSError):
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
  return {
      "cpu": cpu,
      "cpu_count": os.cpu_count(),
      "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
      "device": jax.devices()[0].device_kind,
      "platform": platform.platform(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "code": code_version(),
      "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS"),
      "time": time.strftime("%Y-%m-%d %H:%M:%S"),
  }


@contextlib.contextmanager
def _locked(path: pathlib.Path):
  path.parent.mkdir(parents=True, exist_ok=True)
  digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
  lock_path = pathlib.Path(tempfile.gettempdir()) / f"ngalore-bench-{digest}.lock"
  with open(lock_path, "w", encoding="utf-8") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def read_json(path: pathlib.Path) -> dict[str, Any]:
  """The JSON object at ``path``, or ``{}`` if there is none."""
  path = pathlib.Path(path)
  if not path.is_file():
    return {}
  return json.loads(path.read_text(encoding="utf-8"))


def update_json(path: pathlib.Path, fn: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
  """Re-reads ``path``, lets ``fn`` change the object in place, writes it back atomically.

  A file lock makes concurrent writers (background chunks) safe; nothing is lost on a crash.
  """
  path = pathlib.Path(path)
  with _locked(path):
    data = read_json(path)
    fn(data)
    text = json.dumps(data, indent=1, sort_keys=True, default=_plain)
    fetch.write_atomic(path, text.encode())
  return data


def _plain(value: Any) -> Any:
  if hasattr(value, "tolist"):
    return value.tolist()
  return str(value)


def parse_lrs(text: str) -> dict[str, float]:
  """``"adamw=1e-5,lora=3e-4"`` -> ``{"adamw": 1e-05, "lora": 0.0003}``.

  Examples:
    >>> parse_lrs("adamw=1e-5, lora=3e-4")
    {'adamw': 1e-05, 'lora': 0.0003}
  """
  out = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep:
      raise ValueError(f"--lrs: {item!r} is not OPTIMIZER=LR")
    out[name.strip()] = float(value)
  return out


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
  """``"mean ± std"`` of ``values`` times ``scale`` (the mean alone for one value, ``-`` for none).

  Examples:
    >>> mean_std([0.5, 0.7], 100)
    '60.0 ± 14.1'
  """
  if not values:
    return "-"
  mean = statistics.fmean(values) * scale
  if len(values) < 2:
    return f"{mean:.{digits}f}"
  return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
  """A GitHub markdown table."""
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
  return "\n".join(lines)
