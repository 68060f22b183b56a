"""Sentence classification: held-out accuracy and optimizer-state memory per optimizer and rank.

Each run is ``python -m train.classify`` itself: its config parser
(:func:`train.classify.from_argv`), set-up (:func:`train.classify.setup`) and training loop
(:func:`train.loop.train_and_evaluate`), called in this process with a workdir of its own, so a
run here is exactly the run a user gets with the same flags. Every run gets the same steps,
batches (the data order is a function of the seed), seeds, schedule (warm-up then cosine decay)
and held-out split; the optimizers with a rank (LoRA, GaLore, Natural GaLore) run at each
``--ranks``, AdamW (no rank) once per seed. Only the peak learning rate differs per optimizer
(``--lrs``).

Per run it records, from the run's own files:

* ``accuracy_step0`` / ``accuracy_final`` (and ``f1_*``, ``mcc_*``, ``eval_loss_*``): the
  evaluation lines of ``metrics.jsonl`` at step 0 (the pretrained encoder with the seed's random
  head) and at the last step, over the whole held-out split;
* ``optimizer_state_bytes``: the optimizer state as the run's ``config.json`` reports it
  (``memory_bytes``: :func:`ngalore_jax.optimizer_state_bytes` of the abstract state), with the
  trainable parameters and LoRA's adapters alongside;
* ``wall_time_sec`` (set-up, compilation and both evaluations included) and the median logged
  training throughput.

Finished runs are written to the results JSON at once (atomically, under a file lock); rerunning
skips them, and a run cut short resumes from its workdir's checkpoint. A results file holds runs
of one setting (steps, batch, sequence length, data); another setting needs another ``--out``.
``--report`` prints the table: accuracy mean ± std over seeds per optimizer and rank, the paired
difference to LoRA at the same rank (same seed, so same batches and head), state memory, and the
average GLUE scores the Natural GaLore paper reports for RoBERTa-base beside them.

Run (all-MiniLM-L6-v2 and the sentiment sentences come from installed packages; 64 tokens
truncate 6 of the 10,568 sentences). Commands started side by side share the runs out; on two
CPU cores shared with other jobs, three of them took 14 to 44 minutes a run:

  python -m benchmarks.classify --steps 100 --batch-size 16 --seq-len 64 --seeds 2 --ranks 8,4 \\
      --optimizers adamw,natural_galore,galore,lora
  python -m benchmarks.classify --report
"""

from __future__ import annotations

import os

# As in train.classify: OpenBLAS threads spin-wait inside LAPACK on a shared CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=wrong-import-position
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import pathlib
import shlex
import statistics
import sys
import time
from typing import Any, Optional

from benchmarks import _common  # pylint: disable=wrong-import-position

DEFAULT_OPTIMIZERS = ("adamw", "lora", "galore", "natural_galore")
#: Peak learning rates per optimizer, from the usual ranges for BERT fine-tuning, not swept:
#: full AdamW small, LoRA and the projected optimizers (GaLore's scale 0.25, the trainer's
#: default) larger.
DEFAULT_LRS = {"adamw": 1e-4, "lora": 1e-3, "galore": 1e-3, "natural_galore": 1e-3}
#: Any other registered optimizer, unless ``--lrs`` names it.
FALLBACK_LR = 1e-4
BASELINE = "lora"
MIB = 1024 ** 2
DEFAULT_OUT = _common.RESULTS_DIR / "classify.json"

#: Average GLUE score (8 tasks) of RoBERTa-base fine-tuning at rank 4, as reported in Das,
#: "Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and Fine-tuning"
#: (arXiv:2410.16029, 2024); ``None`` is full fine-tuning (AdamW, no rank).
PAPER_GLUE_AVERAGE = {("adamw", None): 86.28, ("lora", 4): 85.61, ("galore", 4): 85.89,
                      ("natural_galore", 4): 86.05}

# What makes two runs comparable: a results file holds runs of one setting only.
SETTING_FIELDS = ("init", "task", "data", "eval_data", "steps", "seq_len", "batch_size",
                  "warmup_steps", "extra")


def setting_of(args: argparse.Namespace) -> dict[str, Any]:
  """The flags every run of a results file shares."""
  return {field: getattr(args, field) for field in SETTING_FIELDS}


def run_key(optimizer: str, rank: Optional[int], lr: float, seed: int) -> str:
  """``"lora r=8 lr=0.001 seed=0"``; no ``r=`` for an optimizer without a rank."""
  ranked = "" if rank is None else f" r={rank}"
  return f"{optimizer}{ranked} lr={lr:g} seed={seed}"


def _setting_id(setting: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]


def has_rank(optimizer: str) -> bool:
  return bool(_common.taken_options(optimizer, rank=1))


def classify_argv(setting: dict[str, Any], optimizer: str, rank: Optional[int], lr: float,
                  seed: int, workdir: pathlib.Path, cache_dir: Optional[str]) -> list[str]:
  """The ``python -m train.classify`` arguments of one run."""
  steps = setting["steps"]
  argv = ["--optimizer", optimizer, "--lr", repr(lr), "--seed", str(seed),
          "--steps", str(steps), "--seq-len", str(setting["seq_len"]),
          "--batch-size", str(setting["batch_size"]),
          "--warmup-steps", str(setting["warmup_steps"]),
          # Evaluate at step 0 and at the end only; checkpoint now and then (for resuming).
          "--eval-every", str(steps), "--checkpoint-every", str(max(1, min(50, steps))),
          "--log-every", str(max(1, min(10, steps))), "--no-progress",
          "--workdir", str(workdir)]
  for flag in ("init", "task", "data", "eval_data"):
    if setting[flag] is not None:
      argv += [f"--{flag.replace('_', '-')}", str(setting[flag])]
  if rank is not None:
    argv += ["--rank", str(rank)]
  if cache_dir:
    argv += ["--cache-dir", cache_dir]
  return argv + shlex.split(setting["extra"] or "")


class _NoStepZeroEval:
  """An evaluator that skips the step-0 evaluation (the loop still logs the step-0 loss)."""

  def __init__(self, inner: Any):
    self._inner = inner

  def loss(self, params: Any, batch: Any) -> float:
    return self._inner.loss(params, batch)

  def __call__(self, params: Any, step: Optional[int] = None) -> dict[str, float]:
    return {} if step == 0 else self._inner(params, step)


def run_one(setting: dict[str, Any], optimizer: str, rank: Optional[int], lr: float, seed: int,
            workdir: pathlib.Path, cache_dir: Optional[str], step0_eval: bool = True
            ) -> dict[str, Any]:
  """One classification run (resumed if its workdir holds a checkpoint) and its record.

  ``step0_eval=False`` skips the evaluation at step 0 (``accuracy_step0`` is then ``None``);
  training and the final evaluation are those of ``python -m train.classify``.

  Raises:
    train.config.ConfigError: a flag does not fit (one line).
    KeyboardInterrupt: the run was interrupted (it resumes from its checkpoint next time).
  """
  # pylint: disable=import-outside-toplevel
  from train import classify, loop
  from train import metrics as metrics_lib

  config = classify.from_argv(
      classify_argv(setting, optimizer, rank, lr, seed, workdir, cache_dir))

  def make_setup(c: Any) -> Any:
    s = classify.setup(c)
    if step0_eval:
      return s
    make = s.make_evaluator
    return dataclasses.replace(s, make_evaluator=lambda s2: _NoStepZeroEval(make(s2)))

  start = time.perf_counter()
  summary = loop.train_and_evaluate(config, setup=make_setup)
  wall = time.perf_counter() - start
  if summary["interrupted"] or summary["stopped_early"]:
    raise KeyboardInterrupt
  records = metrics_lib.read_metrics(summary["metrics"])
  evals = {r["step"]: r for r in records if "eval_accuracy" in r}
  last = max(evals)
  rates = [r["tokens_per_sec"] for r in records
           if r.get("step", 0) > 0 and r.get("tokens_per_sec") is not None]
  if len(rates) > 1:
    rates = rates[1:]  # the first interval carries the first dispatch
  resolved = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
  memory = resolved["memory_bytes"]
  record = {
      "optimizer": optimizer, "rank": rank, "lr": lr, "seed": seed,
      "steps": summary["steps_done"], "eval_step": last, "workdir": str(workdir),
      "optimizer_state_bytes": memory["optimizer_state"]["total"],
      "optimizer_state": memory["optimizer_state"],
      "param_bytes": memory["params"],
      "trainable_param_bytes": memory["trainable_params"],
      "trainable_params": resolved["trainable_params"],
      "adapter_bytes": memory["adapters"],
      "tokens_per_sec": statistics.median(rates) if rates else summary.get("tokens_per_sec"),
      "wall_time_sec": wall,
      "train_examples": resolved["dataset"]["examples"],
      "truncated_train": resolved["dataset"]["truncated"],
      "held_out_examples": resolved["eval_dataset"]["examples"],
      "held_out_per_class": resolved["eval_dataset"]["per_class"],
      "truncated_eval": resolved["eval_dataset"]["truncated"],
  }
  for metric in ("accuracy", "f1", "mcc", "loss"):  # f1 only for two classes
    record[f"{metric}_step0"] = evals[0].get(f"eval_{metric}") if 0 in evals else None
    record[f"{metric}_final"] = evals[last].get(f"eval_{metric}")
  return record


# The report.


def _order(name: str) -> tuple:
  known = name in DEFAULT_OPTIMIZERS
  return (not known, DEFAULT_OPTIMIZERS.index(name) if known else 0, name)


def summarize(data: dict[str, Any]) -> dict[tuple[str, Optional[int], float], dict[str, Any]]:
  """The table's rows, keyed ``(optimizer, rank, lr)``, each with its runs by seed and figures.

  Accuracies are fractions. ``delta`` pairs each seed with LoRA's run of the same rank and seed
  (the LoRA learning rate of the best mean final accuracy at that rank, when there are several:
  the comparison favours LoRA, never the other way).
  """
  groups: dict[tuple[str, Optional[int], float], dict[int, dict[str, Any]]] = {}
  for record in data.get("runs", {}).values():
    key = (record["optimizer"], record["rank"], record["lr"])
    groups.setdefault(key, {})[record["seed"]] = record

  def mean_final(key):
    return statistics.fmean(r["accuracy_final"] for r in groups[key].values())

  baselines = {}
  for rank in {k[1] for k in groups if k[0] == BASELINE}:
    lora = [k for k in groups if k[0] == BASELINE and k[1] == rank]
    baselines[rank] = max(lora, key=lambda k: (mean_final(k), len(groups[k])))
  out = {}
  for key in sorted(groups, key=lambda k: (k[1] is not None, k[1] or 0, _order(k[0]), k[2])):
    runs = groups[key]
    seeds = sorted(runs)
    base = groups[baselines[key[1]]] if key[1] in baselines else {}
    paired = [s for s in seeds if s in base] if key != baselines.get(key[1]) else []
    first = runs[seeds[0]]
    out[key] = {
        "runs": runs, "seeds": seeds, "baseline": baselines.get(key[1]),
        "final": [runs[s]["accuracy_final"] for s in seeds],
        "step0": [runs[s]["accuracy_step0"] for s in seeds
                  if runs[s]["accuracy_step0"] is not None],
        "f1": [runs[s]["f1_final"] for s in seeds if runs[s]["f1_final"] is not None],
        "mcc": [runs[s]["mcc_final"] for s in seeds if runs[s]["mcc_final"] is not None],
        "delta": [runs[s]["accuracy_final"] - base[s]["accuracy_final"] for s in paired],
        "optimizer_state_bytes": first["optimizer_state_bytes"],
        # GaLore-style: projectors, projected moments, Natural GaLore's gradient history; the
        # rest ("other") is AdamW's state of the leaves left unprojected (embeddings, head).
        "projected_state_bytes": (first["optimizer_state"]["total"]
                                  - first["optimizer_state"]["other"]
                                  if first["optimizer_state"].get("projectors") else None),
        "trainable_param_bytes": first["trainable_param_bytes"],
        "wall_time_sec": statistics.median(runs[s]["wall_time_sec"] for s in seeds),
    }
  return out


def majority(record: dict[str, Any]) -> float:
  """The held-out accuracy of always guessing the most frequent class."""
  counts = record["held_out_per_class"]
  return max(counts) / sum(counts)


def report(out: pathlib.Path) -> str:
  """The markdown report of a results file."""
  data = _common.read_json(out)
  rows = summarize(data)
  if not rows:
    return f"no runs in {out}"
  setting = data.get("setting", {})
  lrs = {k[0]: set() for k in rows}
  for name, _, lr in rows:
    lrs[name].add(lr)
  header = ["optimizer", "rank", "lr", "seeds", "acc @ step 0 (%)", "acc final (%)",
            f"Δ acc vs {BASELINE} same rank (pts, paired)", "F1 final", "MCC final",
            "optimizer state (MiB)", "of it, projected kernels' (MiB)", "trainable params (MiB)", "wall per run (min)",
            "paper: GLUE avg, RoBERTa-base"]
  table = []
  for (name, rank, lr), r in rows.items():
    paper = PAPER_GLUE_AVERAGE.get((name, rank))
    table.append([
        name if len(lrs[name]) == 1 else f"{name} @ {lr:g}", "-" if rank is None else rank,
        f"{lr:g}", len(r["seeds"]), _common.mean_std(r["step0"], 100),
        _common.mean_std(r["final"], 100),
        "-" if not r["delta"] else f"{_common.mean_std(r['delta'], 100)} (n={len(r['delta'])})",
        _common.mean_std(r["f1"], digits=3), _common.mean_std(r["mcc"], digits=3),
        f"{r['optimizer_state_bytes'] / MIB:.2f}",
        "-" if r["projected_state_bytes"] is None else f"{r['projected_state_bytes'] / MIB:.2f}",
        f"{r['trainable_param_bytes'] / MIB:.2f}",
        f"{r['wall_time_sec'] / 60:.1f}", "-" if paper is None else f"{paper:.2f}"])
  first = next(iter(rows.values()))["runs"]
  record = first[min(first)]
  step0 = {}  # per seed: every run of a seed starts from the same model
  for r in data["runs"].values():
    if r["accuracy_step0"] is not None:
      step0.setdefault(r["seed"], r["accuracy_step0"])
  lines = [
      f"Sentence classification ({setting.get('task') or setting.get('data') or 'sentiment'}):"
      f" {setting.get('steps')} steps, batch {setting.get('batch_size')} x "
      f"{setting.get('seq_len')} tokens, warm-up {setting.get('warmup_steps')} then cosine; "
      f"held-out accuracy over {record['held_out_examples']} sentences (majority guess "
      f"{majority(record):.1%}); {record['train_examples']} training sentences, "
      f"{record['truncated_train']} truncated.",
      f"Step 0 (the pretrained encoder with the seed's random head, the same model for every "
      f"optimizer; evaluated in the runs of the first optimizer only): "
      f"{_common.mean_std(list(step0.values()), 100)} % over {len(step0)} seeds.",
      "Paper column: average GLUE score (8 tasks) of RoBERTa-base fine-tuning as reported in "
      "Das, \"Natural GaLore: Accelerating GaLore for memory-efficient LLM Training and "
      "Fine-tuning\" (arXiv:2410.16029, 2024), rank 4 rows and full fine-tuning (AdamW row); "
      "another model, other tasks and far longer training: only the ordering compares.",
      "", _common.markdown_table(header, table), ""]
  for (name, rank, lr), r in rows.items():
    if not r["delta"]:
      continue
    base = rows[r["baseline"]]
    delta = statistics.fmean(r["delta"])
    wins = sum(d > 0 for d in r["delta"])
    lines.append(
        f"- {name} r{rank} vs {BASELINE} r{rank}: accuracy {delta * 100:+.1f} pts (higher in "
        f"{wins} of {len(r['delta'])} seeds); optimizer state "
        f"{r['optimizer_state_bytes'] / MIB:.2f} vs {base['optimizer_state_bytes'] / MIB:.2f} MiB")
  return "\n".join(lines)


@contextlib.contextmanager
def _claimed(workdir: pathlib.Path):
  """Yields whether this process holds ``workdir``'s run: commands started side by side share
  the runs out instead of running the same one twice."""
  workdir.parent.mkdir(parents=True, exist_ok=True)
  with open(workdir.parent / f".{workdir.name}.lock", "w", encoding="utf-8") as lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      yield False
      return
    try:
      yield True
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.classify", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                      help="registered optimizers to compare (comma-separated)")
  parser.add_argument("--ranks", default="4,8",
                      help="ranks of the optimizers that take one (comma-separated)")
  parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (data order, head)")
  parser.add_argument("--lrs", default="",
                      help=f"peak learning rates, OPTIMIZER=LR,... over {DEFAULT_LRS} "
                           f"(others: {FALLBACK_LR:g})")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--seq-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--warmup-steps", type=int, default=None,
                      help="default: a tenth of --steps")
  parser.add_argument("--init", default=None,
                      help="Hugging Face BERT directory (default: all-MiniLM-L6-v2)")
  parser.add_argument("--task", default=None, help="built-in task (default: sentiment)")
  parser.add_argument("--data", default=None, help="training examples, GLUE-format TSV")
  parser.add_argument("--eval-data", default=None, help="held-out examples, GLUE-format TSV")
  parser.add_argument("--extra", default="",
                      help="more python -m train.classify flags for every run (quoted)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--workdir-root", type=pathlib.Path,
                      default=pathlib.Path("runs/bench-classify"),
                      help="run directories go under ROOT/<setting id>/")
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--step0-eval", choices=("first", "all"), default="first",
                      help="evaluate at step 0 only in the runs of the first optimizer of "
                           "--optimizers (at its first rank), or in every run: a seed's runs "
                           "all start from the same model (LoRA's adapters from zero)")
  parser.add_argument("--report", action="store_true", help="only print the table")
  parser.add_argument("--force", action="store_true", help="re-run runs already in the JSON")
  args = parser.parse_args(argv)

  if not args.report:
    if args.warmup_steps is None:
      args.warmup_steps = args.steps // 10
    try:
      lrs = {**DEFAULT_LRS, **_common.parse_lrs(args.lrs)}
      ranks = [int(r) for r in args.ranks.split(",") if r.strip()]
    except ValueError as e:
      parser.error(str(e))
    from train import optimizers as train_optimizers  # pylint: disable=import-outside-toplevel
    names = [n.strip() for n in args.optimizers.split(",") if n.strip()]
    unknown = [n for n in names if n not in train_optimizers.REGISTRY]
    if unknown:
      parser.error(f"--optimizers: unknown {unknown}; registered: "
                   f"{', '.join(train_optimizers.REGISTRY)}")
    setting = setting_of(args)
    held = _common.read_json(args.out).get("setting")
    if held is not None and held != setting:
      parser.error(f"{args.out} holds runs of another setting {held}; use another --out")
    _common.enable_compilation_cache(args.cache_dir)
    root = args.workdir_root / _setting_id(setting)
    plan = [(name, rank, seed) for seed in range(args.seeds)  # seed-major: pairs appear early
            for rank in ranks for name in names if has_rank(name)]
    plan = [(name, None, seed) for seed in range(args.seeds)
            for name in names if not has_rank(name)] + plan
    first = (names[0], ranks[0] if has_rank(names[0]) and ranks else None)
    for name, rank, seed in plan:
      lr = lrs.get(name, FALLBACK_LR)
      key = run_key(name, rank, lr, seed)
      if key in _common.read_json(args.out).get("runs", {}) and not args.force:
        print(f"skip {key} (in {args.out})", file=sys.stderr)
        continue
      workdir = root / key.replace(" ", "-").replace("=", "")
      with _claimed(workdir) as mine:
        if not mine:
          print(f"skip {key} (another process runs it)", file=sys.stderr)
          continue
        if key in _common.read_json(args.out).get("runs", {}) and not args.force:
          continue  # finished by another process meanwhile
        print(f"run {key}", file=sys.stderr, flush=True)
        from train.config import ConfigError  # pylint: disable=import-outside-toplevel
        try:
          record = run_one(setting, name, rank, lr, seed, workdir, args.cache_dir,
                           step0_eval=args.step0_eval == "all" or (name, rank) == first)
        except ConfigError as e:
          print(f"error: {e}", file=sys.stderr)
          return 2
        except KeyboardInterrupt:
          print("interrupted: rerun the same command to resume", file=sys.stderr)
          return 130
        step0 = record["accuracy_step0"]
        print(f"  {key}: accuracy {'-' if step0 is None else f'{step0:.1%}'} -> "
              f"{record['accuracy_final']:.1%}; optimizer state "
              f"{record['optimizer_state_bytes'] / MIB:.2f} MiB; "
              f"{record['wall_time_sec'] / 60:.1f} min", file=sys.stderr, flush=True)

        def put(data, key=key, record=record):
          data["setting"] = setting
          data.setdefault("machine", _common.machine_info())
          data.setdefault("runs", {})[key] = record
        _common.update_json(args.out, put)  # while holding the run: no one repeats it
  print(report(args.out))
  return 0


if __name__ == "__main__":
  sys.exit(main())
