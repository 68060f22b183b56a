"""Function-calling fine-tuning: held-out BFCL accuracy and memory per optimizer, at equal steps.

Each run is ``python -m train.finetune`` itself: its config parser, set-up
(:func:`train.finetune.setup`) and training loop (:func:`train.loop.train_and_evaluate`), called
in this process with a workdir of its own, so a run here is exactly the run a user gets with the
same flags. Every optimizer gets the same steps, batches (the data order is a function of the
seed), seeds, schedule (warm-up then cosine decay), rank (``--rank``, where the optimizer takes
one) and held-out examples; only the peak learning rate differs (``--lrs``).

Per run it records:

* ``accuracy_step0`` / ``accuracy_final``: ``eval_accuracy`` of the run's ``metrics.jsonl`` at
  step 0 and at the last step (greedy decoding of the first ``--eval-examples`` held-out
  examples, scored by BFCL's AST rules, :mod:`train.bfcl`);
* ``optimizer_state_bytes``: the optimizer state, as the run's ``config.json`` reports it
  (``memory_bytes``: :func:`ngalore_jax.optimizer_state_bytes` of the abstract state), with the
  trainable parameters and LoRA's adapters alongside;
* ``xla_peak_estimate_bytes`` (and its parts): XLA's ``memory_analysis()`` of the trainer's own
  compiled train step (:func:`train.build.compile_train_step`, read by
  :func:`benchmarks.memory.memory_analysis_bytes`): arguments + outputs - donated + temporaries,
  the memory one step needs (weights, state, gradients, activations);
* ``tokens_per_sec``: the median of the run's logged training throughput (evaluation excluded);
* ``skipped_train`` / ``skipped_eval``: examples dropped because their prompt and answer exceed
  ``--seq-len`` tokens (printed after each run and in the report).

Finished runs are written to the results JSON at once (atomically); rerunning skips them, and a
run cut short resumes from its workdir's checkpoint. ``--report`` prints the table: accuracy
mean ± std over seeds, the paired difference to LoRA (same seed, so same batches), memory and
throughput, then one line per optimizer stating whether it beats LoRA with less memory; and it
draws ``benchmarks/results/finetune.png`` (accuracy per optimizer, one dot per seed; peak step
memory).

The default learning rates (:data:`DEFAULT_LRS`) are UNTUNED guesses (LoRA and the low-rank
projections usually want a larger step than full AdamW); pass ``--lrs`` to change them. Runs at
other learning rates join the same results file (the key is optimizer, lr and seed), so a small
sweep is several commands; the table then has one row per optimizer and lr, and the LoRA row the
others are paired with is LoRA's best.

Run (SmolLM2-135M-Instruct and BFCL are fetched once; CPU-sized, hours on a few cores):

  python -m benchmarks.finetune --steps 100 --seq-len 512 --eval-examples 40 --seeds 2
  python -m benchmarks.finetune --report

A GPU run is the same command (JAX picks the accelerator); more steps or held-out examples fit
there, e.g. ``--steps 500 --eval-examples 92``. Other registered optimizers:
``--optimizers adamw,lora,galore,natural_galore,apollo``.
"""

from __future__ import annotations

import os

# As in train.finetune: OpenBLAS threads spin-wait inside LAPACK on a shared CPU.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=wrong-import-position
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
#: Peak learning rates per optimizer: untuned defaults, not the result of a sweep.
DEFAULT_LRS = {"adamw": 5e-5, "lora": 5e-4, "galore": 2e-4, "natural_galore": 2e-4}
#: Any other registered optimizer, unless ``--lrs`` names it.
FALLBACK_LR = 1e-4
BASELINE = "lora"
MIB = 1024 ** 2
DEFAULT_OUT = _common.RESULTS_DIR / "finetune.json"

# What makes two runs comparable: a results file holds runs of one setting only.
SETTING_FIELDS = ("init", "task", "data", "eval_data", "steps", "seq_len", "batch_size",
                  "warmup_steps", "eval_examples", "max_new_tokens", "rank", "extra")


parse_lrs = _common.parse_lrs


def setting_of(args: argparse.Namespace) -> dict[str, Any]:
  """The flags every run of a results file shares."""
  return {field: getattr(args, field) for field in SETTING_FIELDS}


def run_key(optimizer: str, lr: float, seed: int) -> str:
  return f"{optimizer} lr={lr:g} seed={seed}"


def _setting_id(setting: dict[str, Any]) -> str:
  return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:10]


def finetune_argv(setting: dict[str, Any], optimizer: str, lr: float, seed: int,
                  workdir: pathlib.Path, cache_dir: Optional[str]) -> list[str]:
  """The ``python -m train.finetune`` arguments of one run."""
  argv = ["--optimizer", optimizer, "--lr", repr(lr), "--seed", str(seed),
          "--steps", str(setting["steps"]), "--seq-len", str(setting["seq_len"]),
          "--batch-size", str(setting["batch_size"]),
          "--warmup-steps", str(setting["warmup_steps"]),
          "--max-new-tokens", str(setting["max_new_tokens"]),
          # Evaluate at step 0 and at the end only; checkpoint at the end (and for resuming).
          "--eval-every", str(setting["steps"]), "--checkpoint-every",
          str(max(1, min(50, setting["steps"]))), "--log-every", "1", "--no-progress",
          "--workdir", str(workdir)]
  for flag in ("init", "task", "data", "eval_data", "eval_examples"):
    if setting[flag] is not None:
      argv += [f"--{flag.replace('_', '-')}", str(setting[flag])]
  if setting["rank"] is not None and _common.taken_options(optimizer, rank=1):
    argv += ["--rank", str(setting["rank"])]
  if cache_dir:
    argv += ["--cache-dir", cache_dir]
  return argv + shlex.split(setting["extra"] or "")


def run_one(setting: dict[str, Any], optimizer: str, lr: float, seed: int,
            workdir: pathlib.Path, cache_dir: Optional[str]) -> dict[str, Any]:
  """One fine-tuning run (resumed if its workdir holds a checkpoint) and its record.

  Raises:
    train.config.ConfigError: a flag does not fit (one line).
  """
  # pylint: disable=import-outside-toplevel
  from benchmarks import memory as memory_lib
  from train import build, finetune, loop
  from train import metrics as metrics_lib

  config = finetune.from_argv(finetune_argv(setting, optimizer, lr, seed, workdir, cache_dir))
  built: list[Any] = []

  def make_setup(c: Any) -> Any:
    built.append(finetune.setup(c))
    return built[-1]

  start = time.perf_counter()
  summary = loop.train_and_evaluate(config, setup=make_setup)
  wall = time.perf_counter() - start
  if summary["interrupted"] or summary["stopped_early"]:
    raise KeyboardInterrupt  # the run resumes from its checkpoint next time
  records = metrics_lib.read_metrics(summary["metrics"])
  accuracy = {r["step"]: r["eval_accuracy"] for r in records if "eval_accuracy" in r}
  evals = {r["step"]: r for r in records if "eval_accuracy" in r}
  last = max(evals)
  rates = [r["tokens_per_sec"] for r in records
           if r.get("step", 0) > 0 and r.get("tokens_per_sec") is not None]
  if len(rates) > 1:
    rates = rates[1:]  # the first interval carries the first dispatch
  resolved = json.loads((workdir / "config.json").read_text(encoding="utf-8"))
  memory = resolved["memory_bytes"]
  step_memory = memory_lib.memory_analysis_bytes(build.compile_train_step(built[-1]))
  return {
      "optimizer": optimizer, "lr": lr, "seed": seed, "steps": summary["steps_done"],
      "workdir": str(workdir),
      "accuracy_step0": accuracy.get(0), "accuracy_final": accuracy[last],
      "parsed_step0": evals[0]["eval_parsed"] if 0 in evals else None,
      "parsed_final": evals[last]["eval_parsed"],
      "eval_loss_step0": evals[0]["eval_loss"] if 0 in evals else None,
      "eval_loss_final": evals[last]["eval_loss"],
      "eval_step": last,
      "optimizer_state_bytes": memory["optimizer_state"]["total"],
      "optimizer_state": memory["optimizer_state"],
      "param_bytes": memory["params"],
      "trainable_param_bytes": memory["trainable_params"],
      "adapter_bytes": memory["adapters"],
      **{f"xla_{k}": v for k, v in step_memory.items()},
      "tokens_per_sec": statistics.median(rates) if rates else summary.get("tokens_per_sec"),
      "wall_time_sec": wall,
      "train_examples": resolved["dataset"]["examples"],
      "skipped_train": resolved["dataset"]["skipped_too_long"],
      "held_out_examples": resolved["eval_dataset"]["examples"],
      "skipped_eval": resolved["eval_dataset"]["skipped_too_long"],
  }


# The report.


_mean_std = _common.mean_std


def _order(name: str) -> tuple:
  known = name in DEFAULT_OPTIMIZERS
  return (not known, DEFAULT_OPTIMIZERS.index(name) if known else 0, name)


def summarize(data: dict[str, Any]) -> tuple[dict[str, dict[str, Any]], Optional[str]]:
  """The table's rows and the label of the LoRA row the others are paired with.

  A row is one optimizer at one learning rate (labelled ``name`` when the file holds a single
  learning rate of it, else ``name @ lr``), with its runs by seed and the figures of the table
  (accuracies as fractions). With several LoRA learning rates, the baseline is the one of the
  best mean final accuracy: the comparison favours LoRA, never the other way.
  """
  groups: dict[tuple[str, float], dict[int, dict[str, Any]]] = {}
  for record in data.get("runs", {}).values():
    groups.setdefault((record["optimizer"], record["lr"]), {})[record["seed"]] = record
  lr_count: dict[str, int] = {}
  for name, _ in groups:
    lr_count[name] = lr_count.get(name, 0) + 1
  label = {key: key[0] if lr_count[key[0]] == 1 else f"{key[0]} @ {key[1]:g}" for key in groups}
  mean_final = {key: statistics.fmean(r["accuracy_final"] for r in runs.values())
                for key, runs in groups.items()}
  lora = [key for key in groups if key[0] == BASELINE]
  base_key = max(lora, key=lambda k: (mean_final[k], len(groups[k]))) if lora else None
  base = groups[base_key] if base_key else {}
  out = {}
  for key in sorted(groups, key=lambda k: (_order(k[0]), k[1])):
    runs = groups[key]
    seeds = sorted(runs)
    paired = [s for s in seeds if s in base]
    first = runs[seeds[0]]
    out[label[key]] = {
        "optimizer": key[0], "lr": key[1], "runs": runs, "seeds": seeds,
        "final": [runs[s]["accuracy_final"] for s in seeds],
        "step0": [runs[s]["accuracy_step0"] for s in seeds
                  if runs[s]["accuracy_step0"] is not None],
        "parsed": [runs[s]["parsed_final"] for s in seeds],
        "delta": [runs[s]["accuracy_final"] - base[s]["accuracy_final"] for s in paired],
        "optimizer_state_bytes": first["optimizer_state_bytes"],
        "trainable_param_bytes": first["trainable_param_bytes"],
        "xla_peak": first["xla_peak_estimate_bytes"],
        "tokens_per_sec": statistics.median(runs[s]["tokens_per_sec"] for s in seeds),
        "skipped": (first["skipped_train"], first["train_examples"] + first["skipped_train"],
                    first["skipped_eval"], first["held_out_examples"] + first["skipped_eval"]),
    }
  return out, (label[base_key] if base_key else None)


def report(out: pathlib.Path, plot: bool = True) -> str:
  """The markdown report of a results file (and its plot next to it, ``.png``)."""
  data = _common.read_json(out)
  rows, base_label = summarize(data)
  if not rows:
    return f"no runs in {out}"
  setting = data.get("setting", {})
  base = rows[base_label] if base_label else None
  header = ["optimizer", "lr", "seeds", "acc @ step 0 (%)", "acc final (%)",
            f"Δ acc vs {BASELINE} (pts, paired)", "parsed final (%)", "optimizer state (MiB)",
            "trainable params (MiB)", "XLA peak step (MiB)", f"peak vs {BASELINE}", "tokens/s"]
  table = []
  for name, r in rows.items():
    table.append([
        name, f"{r['lr']:g}", len(r["seeds"]),
        _mean_std(r["step0"], 100), _mean_std(r["final"], 100),
        "-" if name == base_label or not r["delta"] else
        f"{_mean_std(r['delta'], 100)} (n={len(r['delta'])})",
        _mean_std(r["parsed"], 100),
        f"{r['optimizer_state_bytes'] / MIB:.2f}", f"{r['trainable_param_bytes'] / MIB:.2f}",
        f"{r['xla_peak'] / MIB:.1f}",
        f"{r['xla_peak'] / base['xla_peak']:.2f}" if base else "-",
        f"{r['tokens_per_sec']:.0f}"])
  skipped = next(iter(rows.values()))["skipped"]
  lines = [
      f"Fine-tuning for function calling: {setting.get('steps')} steps, batch "
      f"{setting.get('batch_size')} x {setting.get('seq_len')} tokens, rank {setting.get('rank')},"
      f" held-out accuracy over {setting.get('eval_examples') or 'all'} examples "
      f"(greedy, BFCL AST rules); peak learning rates as listed (untuned defaults unless --lrs).",
      f"Dropped as longer than --seq-len {setting.get('seq_len')}: {skipped[0]} of {skipped[1]} "
      f"training and {skipped[2]} of {skipped[3]} held-out examples.",
      "", _common.markdown_table(header, table), ""]
  if base_label and base_label != BASELINE:
    lines.insert(2, f"Baseline: {base_label}, the best mean final accuracy of {BASELINE}'s "
                    "learning rates in the file.")
  if base:
    for name, r in rows.items():
      if name == base_label or not r["delta"]:
        continue
      delta = statistics.fmean(r["delta"])
      wins = sum(d > 0 for d in r["delta"])
      lines.append(
          f"- {name} vs {base_label}: accuracy {delta * 100:+.1f} pts (wins {wins} of "
          f"{len(r['delta'])} seeds); optimizer state {r['optimizer_state_bytes'] / MIB:.2f} vs "
          f"{base['optimizer_state_bytes'] / MIB:.2f} MiB; XLA peak step {r['xla_peak'] / MIB:.1f}"
          f" vs {base['xla_peak'] / MIB:.1f} MiB -> "
          f"{'more' if delta > 0 else 'not more'} accurate, "
          f"{'less' if r['xla_peak'] < base['xla_peak'] else 'not less'} peak memory")
  text = "\n".join(lines)
  if plot:
    _plot(out.with_suffix(".png"), rows, setting)
  return text


def _plot(path: pathlib.Path, rows: dict[str, dict[str, Any]], setting: dict[str, Any]) -> None:
  """Final held-out accuracy per optimizer (bar: mean; dots: seeds; dash: step 0), and peak
  step memory."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  names = list(rows)
  fig, (acc_ax, mem_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for i, name in enumerate(names):
    r = rows[name]
    acc_ax.bar(i, statistics.fmean(r["final"]) * 100, color=f"C{i}", alpha=0.6)
    acc_ax.scatter([i] * len(r["final"]), [a * 100 for a in r["final"]], color="k", s=12,
                   zorder=3)
    if r["step0"]:
      acc_ax.hlines(statistics.fmean(r["step0"]) * 100, i - 0.4, i + 0.4, colors="k",
                    linestyles="dashed", label="step 0" if i == 0 else None)
    mem_ax.bar(i, r["xla_peak"] / MIB, color=f"C{i}", alpha=0.6,
               label="XLA peak step" if i == 0 else None)
    mem_ax.bar(i, r["optimizer_state_bytes"] / MIB, color="k", alpha=0.5, width=0.4,
               label="optimizer state" if i == 0 else None)
  for ax in (acc_ax, mem_ax):
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="lower right")
  top = max(a * 100 for r in rows.values() for a in r["final"] + r["step0"])
  acc_ax.set_ylim(0, min(100, max(5, top * 1.15)))
  acc_ax.set_ylabel("held-out accuracy (%)")
  acc_ax.set_title(f"BFCL accuracy after {setting.get('steps')} steps")
  mem_ax.set_ylabel("MiB")
  mem_ax.set_title("memory")
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m benchmarks.finetune", description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--optimizers", default=",".join(DEFAULT_OPTIMIZERS),
                      help="registered optimizers to compare (comma-separated)")
  parser.add_argument("--seeds", type=int, default=2, help="seeds 0..N-1 (data order, adapters)")
  parser.add_argument("--lrs", default="",
                      help="peak learning rates, OPTIMIZER=LR,... over the untuned defaults "
                           f"{DEFAULT_LRS} (others: {FALLBACK_LR:g})")
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--seq-len", type=int, default=512)
  parser.add_argument("--batch-size", type=int, default=8)
  parser.add_argument("--warmup-steps", type=int, default=None,
                      help="default: a tenth of --steps")
  parser.add_argument("--eval-examples", type=int, default=40,
                      help="held-out examples decoded at step 0 and at the end")
  parser.add_argument("--max-new-tokens", type=int, default=128)
  parser.add_argument("--rank", type=int, default=16,
                      help="rank of every optimizer that takes one (LoRA, GaLore, ...)")
  parser.add_argument("--init", default=None,
                      help="GGUF file or Hugging Face LLaMA directory (default: SmolLM2-135M-Instruct)")
  parser.add_argument("--task", default=None, help="built-in data (default: bfcl, without --data)")
  parser.add_argument("--data", default=None, help="training examples, BFCL JSON lines")
  parser.add_argument("--eval-data", default=None, help="held-out examples, BFCL JSON lines")
  parser.add_argument("--extra", default="",
                      help="more python -m train.finetune flags for every run (quoted)")
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  parser.add_argument("--workdir-root", type=pathlib.Path, default=pathlib.Path("runs/bench-finetune"),
                      help="run directories go under ROOT/<setting id>/")
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--report", action="store_true", help="only print the table / draw the plot")
  parser.add_argument("--force", action="store_true", help="re-run runs already in the JSON")
  parser.add_argument("--no-plot", action="store_true")
  args = parser.parse_args(argv)

  if not args.report:
    if args.warmup_steps is None:
      args.warmup_steps = args.steps // 10
    try:
      lrs = {**DEFAULT_LRS, **parse_lrs(args.lrs)}
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
    for seed in range(args.seeds):  # seed-major: paired comparisons appear early
      for name in names:
        lr = lrs.get(name, FALLBACK_LR)
        key = run_key(name, lr, seed)
        if key in _common.read_json(args.out).get("runs", {}) and not args.force:
          print(f"skip {key} (in {args.out})", file=sys.stderr)
          continue
        print(f"run {key}", file=sys.stderr, flush=True)
        workdir = root / f"{name}-lr{lr:g}-seed{seed}"
        from train.config import ConfigError  # pylint: disable=import-outside-toplevel
        try:
          record = run_one(setting, name, lr, seed, workdir, args.cache_dir)
        except ConfigError as e:
          print(f"error: {e}", file=sys.stderr)
          return 2
        except KeyboardInterrupt:
          print("interrupted: rerun the same command to resume", file=sys.stderr)
          return 130
        print(f"  {key}: accuracy {record['accuracy_step0']:.1%} -> "
              f"{record['accuracy_final']:.1%}; optimizer state "
              f"{record['optimizer_state_bytes'] / MIB:.2f} MiB; XLA peak step "
              f"{record['xla_peak_estimate_bytes'] / MIB:.1f} MiB; "
              f"{record['tokens_per_sec']:.0f} tokens/s; dropped long examples: "
              f"{record['skipped_train']} training, {record['skipped_eval']} held-out",
              file=sys.stderr, flush=True)

        def put(data, key=key, record=record):
          data["setting"] = setting
          data.setdefault("machine", _common.machine_info())
          data.setdefault("runs", {})[key] = record
        _common.update_json(args.out, put)
  print(report(args.out, plot=not args.no_plot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
