"""Held-out loss of AdamW, GaLore and Natural GaLore at equal steps, on a CPU-sized LM.

The default corpus (Shakespeare, :mod:`train.data`), a byte-level BPE tokenizer with
``--vocab`` tokens trained on the TRAIN split only (a 32k vocabulary would make the LM head
dominate the CPU cost), and a small LLaMA (:mod:`models.llama`). Every run: ``--steps`` steps of
batch ``--batch-size`` x ``--seq-len``, warm-up over the first 10% then cosine decay to 0.1 x
the peak lr, global-norm clipping 1.0, no weight decay; the held-out loss is the mean over the
first ``--eval-sequences`` sequences of the validation split (four whole plays never trained on),
every ``--eval-every`` steps. The seed sets both the initialisation and the data order.

Variants (``--optimizers``, see :data:`VARIANTS`): ``adamw``; ``optax_galore``
(``optax.contrib.galore``); GaLore-Adam on either side (``galore`` = ``proj_type="std"``,
``galore_reverse``) and two-sided (``galore_full``); Natural GaLore in the paper's setting
(``natural_galore_paper``: exponent -1, damping 1e-3 absolute, history 10, float32, std side),
with the exponent -1/2 and relative damping (``natural_galore_sqrt``), in the authors' code's
setting (``natural_galore_official``: ``ng.OFFICIAL_CODE_SETTINGS``), with an int8 or bf16
history, with the Kronecker-factored curvature instead of the history
(``natural_galore_kronecker``), and at the library's defaults (``natural_galore_defaults``). All
GaLore variants: rank ``--rank``, gap ``--update-proj-gap``, scale 0.25, exact SVD, refresh
policy ``keep`` unless the variant says otherwise.

Settings (``--setting``): ``small`` (the first study: d 128, 2 layers, 2k BPE vocabulary,
300 steps; ``convergence.json``) and ``d256`` (d 256, 4 layers, 8k BPE vocabulary, 1,000 steps;
``convergence_d256.json``). Each flag of :class:`Setting` overrides the preset's value.

Phases, each writing every finished run to the results JSON at once (re-running skips runs
already there, so the work can be split into background chunks):

* ``--phase sweep``: each variant at each lr of its grid, seed 0.
* ``--phase seeds``: each variant at its best sweep lr, seeds ``0 .. --seeds - 1``.
* ``--ablation rank,gap,history,damping,exponent,refresh,side``: one knob changed from the base
  setting, at the variant's chosen lr, seeds ``0 .. --seeds - 1``.
* ``--report``: only print the tables and draw the plot from the JSON.

Run:  python -m benchmarks.convergence --phase sweep
      python -m benchmarks.convergence --setting d256 --phase sweep --optimizers adamw --lrs 1e-3,3e-3
      python -m benchmarks.convergence --phase seeds --seeds 3
      python -m benchmarks.convergence --ablation refresh --seeds 2
      python -m benchmarks.convergence --ablation rank,gap,history,damping,exponent --seeds 1
"""

from __future__ import annotations

import os

# LAPACK (the SVD of a projector refresh) runs in OpenBLAS, whose worker threads spin-wait: on a
# CPU shared with other processes one 512 x 1376 SVD took 4-14 s with its default threads and
# 0.09 s with one. Set before jax (and its LAPACK) is imported; export the variable to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import json
import math
import pathlib
import statistics
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import _common
from train import optimizers as train_optimizers

#: name -> (registered optimizer of :mod:`train.optimizers`, its options). The base runs keep
#: Adam's moments on a refresh (galore-torch's behaviour), pinned although it is now also the
#: library's default (it was "rotate" when most of these runs were made).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "optax_galore": ("optax_galore", {}),
    "galore": ("galore", dict(refresh_policy="keep", proj_type="std")),
    "galore_reverse": ("galore", dict(refresh_policy="keep", proj_type="reverse_std")),
    "galore_full": ("galore", dict(refresh_policy="keep", proj_type="full")),
    "natural_galore_paper": ("natural_galore", dict(exponent=-1.0, damping=1e-3,
                                                    damping_mode="absolute", history_size=10,
                                                    history_dtype="float32",
                                                    refresh_policy="keep", proj_type="std")),
    "natural_galore_sqrt": ("natural_galore", dict(exponent=-0.5, damping=1e-3,
                                                   damping_mode="relative", history_size=10,
                                                   history_dtype="float32",
                                                   refresh_policy="keep", proj_type="std")),
    "natural_galore_paper_bf16": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=10,
        refresh_policy="keep", proj_type="std", history_dtype="bfloat16")),
    "natural_galore_paper_int8": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=10,
        refresh_policy="keep", proj_type="std", history_dtype="int8")),
    "natural_galore_official": ("natural_galore_official", {}),
    # Shampoo-style: the inverse square root of the factor, damping relative to its top
    # eigenvalue (the paper's exponent -1 and absolute damping are the alias's defaults).
    "natural_galore_kronecker": ("natural_galore", dict(
        preconditioner="kronecker", exponent=-0.5, damping=1e-3, damping_mode="relative",
        refresh_policy="keep", proj_type="reverse_std")),
    # The paper's step with a short int8 history on the memory-lean side (1.05x GaLore's state
    # at LLaMA-1B rank 512, benchmarks.memory).
    "natural_galore_reverse_int8": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=4,
        history_dtype="int8", refresh_policy="keep", proj_type="reverse_std")),
    # The same step, float32 history of 10, to separate the side from the history's size and dtype.
    "natural_galore_reverse": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=10,
        history_dtype="float32", refresh_policy="keep", proj_type="reverse_std")),
    # The authors' two-sided projection with the memory-lean history (int8, 4 deep) and Adam's
    # default eps: how much of their preset's result survives at GaLore-full's memory.
    "natural_galore_full_int8": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=4,
        history_dtype="int8", refresh_policy="keep", proj_type="full")),
    # The libraries' defaults (reverse_std, refresh "keep"; Natural GaLore: int8 history of 4):
    # the same runs as galore_reverse and natural_galore_reverse_int8 since "keep" became the
    # default, kept so that a later change of a default shows up here.
    "galore_defaults": ("galore", {}),
    "natural_galore_defaults": ("natural_galore", {}),
    # The former defaults (refresh "rotate"), measured behind "keep" at d256.
    "galore_reverse_rotate": ("galore", dict(refresh_policy="rotate", proj_type="reverse_std")),
    "natural_galore_reverse_int8_rotate": ("natural_galore", dict(
        exponent=-1.0, damping=1e-3, damping_mode="absolute", history_size=4,
        history_dtype="int8", refresh_policy="rotate", proj_type="reverse_std")),
    # The alternatives (each at the library's/authors' defaults, rank and gap of the setting).
    "fira": ("fira", {}),
    "apollo": ("apollo", {}),
    "apollo_mini": ("apollo_mini", {}),
    # Adapters on a frozen random base; embeddings, norms and the LM head train (a frozen random
    # LM head could not learn at all).
    "lora": ("lora", dict(lora_others="trained")),
    "relora": ("relora", {}),
    "low_rank": ("low_rank", {}),
}

#: Peak learning rates tried per variant in the sweep (``--lrs`` replaces them).
_ADAM_LIKE = ("adamw", "lora", "relora", "low_rank")
LR_GRIDS = {name: ((1e-3, 3e-3, 1e-2) if name in _ADAM_LIKE else (3e-3, 1e-2, 3e-2))
            for name in VARIANTS}

_NG = ("natural_galore_paper", "natural_galore_sqrt")
_PROJECTED = ("galore",) + _NG

#: ablation -> list of (variant, overrides); the base setting is the variant's seeds run.
ABLATIONS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "rank": [(v, {"rank": r}) for v in _PROJECTED for r in (16, 64)],
    "gap": [(v, {"update_proj_gap": g}) for v in _PROJECTED for g in (20, 100)],
    "history": [(v, {"history_size": h}) for v in _NG for h in (2, 5, 20)],
    "damping": [(v, {"damping": d}) for v in _NG for d in (1e-4, 1e-2, 1e-1)],
    # Disentangles the two changes between the paper and the lead: exponent vs damping mode.
    "exponent": [("natural_galore_paper", {"damping_mode": "relative"}),
                 ("natural_galore_sqrt", {"damping_mode": "absolute"})],
    "refresh": [(v, {"refresh_policy": p})
                for v in _PROJECTED + ("galore_reverse", "natural_galore_reverse_int8")
                for p in ("reset", "rotate")],
    # optax.contrib.galore projects the larger side (coefficients r x min(m, n)); ng's default
    # "std" the smaller one (r x max(m, n)).
    "side": [(v, {"proj_type": "reverse_std"}) for v in _PROJECTED],
}

@dataclasses.dataclass(frozen=True)
class Setting:
  """Everything shared by all runs of one results file (checked on every write)."""
  vocab: int = 2048
  hidden: int = 128
  layers: int = 2
  ffn: int = 352
  heads: int = 4
  seq_len: int = 128
  batch_size: int = 8
  steps: int = 300
  warmup_steps: int = 30
  rank: int = 32
  update_proj_gap: int = 50
  eval_every: int = 50
  eval_sequences: int = 256
  dataset: str = "default"


#: Named settings: ``--setting NAME`` takes its values (each flag still overrides one) and its
#: results file.
SETTINGS = {
    "small": (Setting(), "convergence.json"),
    "d256": (Setting(vocab=8192, hidden=256, layers=4, ffn=688, heads=4, steps=1000,
                     warmup_steps=100, rank=64, update_proj_gap=200, eval_every=100),
             "convergence_d256.json"),
}


def run_key(variant: str, overrides: dict[str, Any], lr: float, seed: int) -> str:
  """The JSON key of a run."""
  extra = ",".join(f"{k}={overrides[k]}" for k in sorted(overrides))
  return f"{variant}[{extra}] lr={lr:g} seed={seed}"


class Runner:
  """Trains and evaluates runs of one :class:`Setting`; compiles once per optimizer setting."""

  def __init__(self, setting: Setting, out: pathlib.Path, cache_dir: Optional[str] = None):
    from models import llama  # pylint: disable=import-outside-toplevel
    from train import data  # pylint: disable=import-outside-toplevel

    self.setting, self.out = setting, out
    tok_path = _common.train_bpe_tokenizer(setting.vocab, dataset=setting.dataset,
                                           cache_dir=cache_dir)
    tokenizer = data.load_tokenizer(str(tok_path))
    load = lambda split: data.load_dataset(setting.dataset, split=split, seq_len=setting.seq_len,
                                           tokenizer=tokenizer, cache_dir=cache_dir)
    self.train_data, self.eval_data = load("train"), load("validation")
    self.model_config = llama.LlamaConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=setting.hidden,
        intermediate_size=setting.ffn, num_layers=setting.layers, num_heads=setting.heads,
        max_position_embeddings=setting.seq_len)
    self.graphdef, _ = llama.abstract_params(self.model_config)
    eval_batch = min(32, setting.eval_sequences)
    self.eval_batches = [jnp.asarray(b) for b in self.eval_data.eval_batches(
        eval_batch, max(1, setting.eval_sequences // eval_batch))]
    self.eval_loss = _common.make_eval_loss(self.graphdef)
    self.schedule = _common.warmup_cosine(setting.steps, setting.warmup_steps)
    self._steps: dict[str, Any] = {}
    self.code = _common.code_version()
    self._check_setting()

  def _check_setting(self) -> None:
    saved = _common.read_json(self.out).get("setting")
    mine = dataclasses.asdict(self.setting)
    if saved is not None and saved != mine:
      raise SystemExit(f"{self.out} holds runs of another setting:\n  {saved}\nnot\n  {mine}\n"
                       "pass --out to write elsewhere")

    def put(data):
      data["setting"] = mine
      device = jax.devices()[0]
      data.setdefault("device", f"{device.platform}: {device.device_kind}")
      data["model"] = dataclasses.asdict(self.model_config)
      data["data"] = {"train": self.train_data.describe(), "eval": self.eval_data.describe(),
                      "eval_tokens": sum(int(b[:, 1:].size) for b in self.eval_batches)}
      data.setdefault("runs", {})
    _common.update_json(self.out, put)

  def runs(self) -> dict[str, Any]:
    return _common.read_json(self.out).get("runs", {})

  def evaluate(self, params) -> float:
    return float(np.mean([float(self.eval_loss(params, b)) for b in self.eval_batches]))

  def _step_fn(self, variant: str, overrides: dict[str, Any]):
    """``(tx, jitted step, parametrization)`` of a variant, built once per setting."""
    key = run_key(variant, overrides, 0, 0)
    if key not in self._steps:
      name, options = VARIANTS[variant]
      options = {**_common.taken_options(name, rank=self.setting.rank,
                                         update_proj_gap=self.setting.update_proj_gap),
                 **options, **overrides}
      config = train_optimizers.make(name, **options)
      config.validate(self.model_config)
      # ReLoRA's jagged re-warm-ups ride on the run's schedule, as in the trainer.
      schedule = config.wrap_schedule(self.schedule)
      tx = train_optimizers.with_clipping(config.build(schedule), 1.0)
      parametrization = config.parametrization()
      self._steps[key] = (tx, _common.make_lr_step(self.graphdef, tx, schedule,
                                                   parametrization=parametrization),
                          parametrization)
    return self._steps[key]

  def run(self, variant: str, overrides: dict[str, Any], lr: float, seed: int, *,
          tag: str, force: bool = False) -> dict[str, Any]:
    """Trains one run (unless already in the JSON) and records it; returns its record."""
    from models import llama  # pylint: disable=import-outside-toplevel
    from train import steps as train_steps  # pylint: disable=import-outside-toplevel

    key = run_key(variant, overrides, lr, seed)
    done = self.runs().get(key)
    if done is not None and not done.get("stale") and not force:
      return done
    s = self.setting
    tx, step, parametrization = self._step_fn(variant, overrides)
    start = time.perf_counter()
    _, params = llama.init_params(self.model_config, seed)
    # The adapters' / factors' initialisation key; the state's key stays the seed's own, so runs
    # without a parametrisation are unchanged.
    key_init = jax.random.fold_in(jax.random.PRNGKey(seed), 1)
    held, opt_state = train_steps.init_train_params(params, tx, parametrization, key_init)
    state = train_steps.TrainState(jnp.zeros((), jnp.int32), held, opt_state,
                                   jax.random.PRNGKey(seed))
    model_params = lambda held: train_steps.model_params(held, parametrization)
    lr_arr = jnp.asarray(lr, jnp.float32)
    eval_steps, eval_losses, train_losses, window = [0], [self.evaluate(params)], [], []
    diverged = False
    for i in range(s.steps):
      batch = jnp.asarray(self.train_data.batch(i, s.batch_size, seed))
      state, metrics = step(state, batch, lr_arr)
      window.append(metrics["train_loss"])
      if (i + 1) % s.eval_every == 0 or i + 1 == s.steps:
        mean_train = float(np.mean(jax.device_get(window)))
        window = []
        train_losses.append(mean_train)
        eval_steps.append(i + 1)
        eval_losses.append(self.evaluate(model_params(state.params)))
        print(f"    {key} step {i + 1}: held-out {eval_losses[-1]:.4f} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        if not math.isfinite(eval_losses[-1]):
          diverged = True
          break
    record = {
        "variant": variant, "overrides": overrides, "lr": lr, "seed": seed, "tag": tag,
        "optimizer": VARIANTS[variant][0], "options": VARIANTS[variant][1],
        "eval_steps": eval_steps, "eval_loss": eval_losses, "train_loss": train_losses,
        "final_eval_loss": eval_losses[-1] if not diverged else float("inf"),
        "diverged": diverged, "wall_sec": time.perf_counter() - start, "code": self.code,
    }
    def put(data):
      runs = data.setdefault("runs", {})
      if key in runs and runs[key].get("stale"):
        runs[key + " [stale]"] = runs.pop(key)
      runs[key] = record
    _common.update_json(self.out, put)
    print(f"  {key:70s} held-out {record['final_eval_loss']:.4f}  "
          f"({record['wall_sec']:.0f} s)", flush=True)
    return record


def final_loss(record: dict[str, Any]) -> float:
  """A run's final held-out loss; ``inf`` for a diverged run (it ranks last)."""
  value = record["final_eval_loss"]
  return value if value is not None and math.isfinite(value) else float("inf")


def chosen_lrs(runs: dict[str, Any]) -> dict[str, float]:
  """Per variant, the sweep's lr with the lowest final held-out loss (seed 0, base setting)."""
  best: dict[str, tuple[float, float]] = {}
  for r in runs.values():
    if r["tag"] != "sweep":
      continue
    loss = final_loss(r)
    if r["variant"] not in best or loss < best[r["variant"]][0]:
      best[r["variant"]] = (loss, r["lr"])
  return {v: lr for v, (_, lr) in best.items()}


def runs_at(runs, variant, overrides, lr) -> dict[int, dict[str, Any]]:
  """Seed -> record for the runs of ``variant`` with exactly ``overrides`` at ``lr``.

  Records marked ``stale`` (made with an older library whose numerics differ, kept for the lr
  sweep only) are left out once a current run replaces them.
  """
  out = {}
  for r in runs.values():
    if r["variant"] == variant and r["overrides"] == overrides and r["lr"] == lr:
      if r["seed"] not in out or out[r["seed"]].get("stale"):
        out[r["seed"]] = r
  return out


def _spread(values: list[float]) -> str:
  if not values:
    return "-"
  mean = statistics.fmean(values)
  if len(values) == 1:
    return f"{mean:.4f}"
  return f"{mean:.4f} ± {statistics.stdev(values):.4f}"


def report(out: pathlib.Path, plot: bool = True) -> str:
  """Markdown tables (sweep, seeds, ablations) from the results JSON; draws the PNG plot."""
  data = _common.read_json(out)
  runs = data.get("runs", {})
  lrs = chosen_lrs(runs)
  parts = []

  # Sweep.
  grid = sorted({r["lr"] for r in runs.values() if r["tag"] == "sweep"})
  rows = []
  for v in VARIANTS:
    cells = []
    for lr in grid:
      rec = next((r for r in runs.values() if r["tag"] == "sweep" and r["variant"] == v
                  and r["lr"] == lr), None)
      cells.append("-" if rec is None else "diverged" if rec["diverged"]
                   else f"{final_loss(rec):.4f}")
    if any(c != "-" for c in cells):
      rows.append([v] + cells + [f"{lrs[v]:g}" if v in lrs else "-"])
  if rows:
    parts.append("Learning-rate sweep (seed 0, final held-out loss):\n\n" + _common.markdown_table(
        ["variant"] + [f"lr {lr:g}" for lr in grid] + ["chosen"], rows))

  # Seeds at the chosen lr.
  base = {v: runs_at(runs, v, {}, lrs[v]) for v in lrs}
  ref = base.get("galore", {})
  rows = []
  for v, by_seed in base.items():
    finals = [final_loss(r) for _, r in sorted(by_seed.items())]
    if not finals:
      continue
    paired = [final_loss(by_seed[s]) - final_loss(ref[s]) for s in sorted(by_seed) if s in ref]
    wins = sum(d < 0 for d in paired)
    rows.append([v, f"{lrs[v]:g}", len(finals), _spread(finals),
                 f"{min(finals):.4f} / {max(finals):.4f}",
                 "-" if v == "galore" or not paired else
                 f"{_spread(paired)} ({wins}/{len(paired)} seeds better)",
                 f"{statistics.fmean(r['wall_sec'] for r in by_seed.values()):.0f}"])
  if rows:
    parts.append("Final held-out loss at the chosen lr (mean ± std over seeds; Δ is paired with "
                 "galore, same seed = same init and data order):\n\n" + _common.markdown_table(
                     ["variant", "lr", "seeds", "held-out loss", "min / max", "Δ vs galore",
                      "s/run"], rows))

  # Ablations.
  rows = []
  for name, entries in ABLATIONS.items():
    for variant in dict.fromkeys(v for v, _ in entries):
      if variant not in lrs:
        continue
      lr = lrs[variant]
      tried = [o for v, o in entries if v == variant]
      measured = {json.dumps(o, sort_keys=True): runs_at(runs, variant, o, lr) for o in tried}
      base_runs = base.get(variant, {})
      knob = next(iter(tried[0]))
      defaults = {"rank": data["setting"]["rank"], "refresh_policy": "keep", "proj_type": "std",
                  "update_proj_gap": data["setting"]["update_proj_gap"], **VARIANTS[variant][1]}
      # Each setting is compared with the base on the seeds both have (paired differences).
      cells = []
      for o in tried:
        by_seed = measured[json.dumps(o, sort_keys=True)]
        seeds = sorted(set(by_seed) & set(base_runs))
        if seeds:
          deltas = [final_loss(by_seed[s]) - final_loss(base_runs[s]) for s in seeds]
          cells.append((str(o[knob]), seeds, [final_loss(by_seed[s]) for s in seeds], deltas))
      if not cells:
        continue
      seeds = sorted(set().union(*[c[1] for c in cells]))
      cells.insert(0, (f"{defaults[knob]} (base)", seeds, [final_loss(base_runs[s]) for s in seeds],
                       [0.0] * len(seeds)))
      best = min((statistics.fmean(c[3]), c[0]) for c in cells)[1]
      for label, row_seeds, finals, deltas in cells:
        rows.append([name, variant, f"{knob}={label}", ",".join(map(str, row_seeds)),
                     _spread(finals),
                     "-" if label.endswith("(base)") else _spread(deltas),
                     "**best**" if label == best else ""])
  if rows:
    parts.append("Ablations (one knob changed from the base setting, at the variant's chosen lr;"
                 " Δ = paired difference to the base on the same seeds, mean ± std; best = lowest"
                 " mean Δ):\n\n" + _common.markdown_table(
                     ["ablation", "variant", "setting", "seeds", "held-out loss", "Δ vs base", ""],
                     rows))
  text = "\n\n".join(parts)
  if plot and base:
    _plot(out.with_suffix(".png"), base, lrs)
  return text


def _plot(path: pathlib.Path, base: dict[str, dict[int, dict[str, Any]]],
          lrs: dict[str, float]) -> None:
  """Held-out loss vs step: mean over seeds, shaded min..max, one line per variant."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, axes = plt.subplots(1, 2, figsize=(11, 4))
  for variant, by_seed in base.items():
    records = [r for r in by_seed.values() if not r["diverged"]]
    if not records:
      continue
    steps = records[0]["eval_steps"]
    losses = np.array([r["eval_loss"] for r in records if r["eval_steps"] == steps])
    label = f"{variant} (lr {lrs[variant]:g}, {len(losses)} seeds)"
    for ax in axes:
      line, = ax.plot(steps, losses.mean(0), label=label)
      ax.fill_between(steps, losses.min(0), losses.max(0), alpha=0.2, color=line.get_color())
  axes[0].set_title("held-out loss")
  axes[1].set_title("second half (variants within 0.2 of the best final loss)")
  finished = [[r for r in b.values() if not r["diverged"]] for b in base.values()]
  finished = [records for records in finished if records]
  if finished:
    means = [statistics.fmean(final_loss(r) for r in records) for records in finished]
    close = [r for records, m in zip(finished, means) if m <= min(means) + 0.2 for r in records]
    last = close[0]["eval_steps"][-1]
    tail = [l for r in close for s, l in zip(r["eval_steps"], r["eval_loss"]) if s >= last / 2]
    axes[1].set_xlim(last / 2, last)
    axes[1].set_ylim(min(tail) - 0.02, max(tail) + 0.02)
  for ax in axes:
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  axes[0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--phase", choices=("sweep", "seeds", "all", "none"), default="none")
  parser.add_argument("--ablation", default="",
                      help=f"comma-separated subset of {','.join(ABLATIONS)}")
  parser.add_argument("--values", default="",
                      help="comma-separated: run only the ablation settings with these values")
  parser.add_argument("--optimizers", default=",".join(VARIANTS),
                      help="variants to run (default: all)")
  parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 (seeds, ablations)")
  parser.add_argument("--only-seeds", default="",
                      help="comma-separated subset of those seeds to run here (to run seeds in "
                           "parallel processes writing the same JSON)")
  parser.add_argument("--lrs", default="",
                      help="comma-separated lrs replacing every variant's sweep grid; with "
                           "--phase seeds one lr, used for variants with no sweep result yet")
  parser.add_argument("--report", action="store_true", help="only print tables / draw the plot")
  parser.add_argument("--setting", choices=tuple(SETTINGS), default="small",
                      help="named setting: its values (each flag below overrides one) and its "
                           "results file")
  parser.add_argument("--out", type=pathlib.Path, default=None,
                      help="results JSON (default: the setting's file in benchmarks/results)")
  parser.add_argument("--cache-dir", default=None)
  parser.add_argument("--force", action="store_true", help="re-run runs already in the JSON")
  parser.add_argument("--no-plot", action="store_true")
  for field in dataclasses.fields(Setting):
    flag = "--" + field.name.replace("_", "-")
    parser.add_argument(flag, type=type(field.default), default=None,
                        help=f"(small: {field.default})")
  args = parser.parse_args(argv)
  preset, filename = SETTINGS[args.setting]
  args.out = args.out or _common.RESULTS_DIR / filename

  variants = [v for v in args.optimizers.split(",") if v]
  unknown = [v for v in variants if v not in VARIANTS]
  ablations = [a for a in args.ablation.split(",") if a]
  unknown += [a for a in ablations if a not in ABLATIONS]
  if unknown:
    parser.error(f"unknown optimizer/ablation {unknown}")
  seeds = list(range(args.seeds))
  if args.only_seeds:
    seeds = sorted({int(x) for x in args.only_seeds.split(",") if x})
    if not set(seeds) <= set(range(args.seeds)):
      parser.error(f"--only-seeds {args.only_seeds}: each must be in 0..{args.seeds - 1}")
  if not args.report:
    setting = dataclasses.replace(preset, **{
        f.name: getattr(args, f.name) for f in dataclasses.fields(Setting)
        if getattr(args, f.name) is not None})
    _common.enable_compilation_cache(args.cache_dir)
    runner = Runner(setting, args.out, cache_dir=args.cache_dir)
    print(f"{runner.model_config}\n{runner.train_data.describe()}\n{runner.eval_data.describe()}",
          flush=True)
    started = time.perf_counter()
    if args.phase in ("sweep", "all"):
      for v in variants:
        grid = [float(x) for x in args.lrs.split(",") if x] or LR_GRIDS[v]
        for lr in grid:
          runner.run(v, {}, lr, 0, tag="sweep", force=args.force)
    if args.phase in ("seeds", "all") or ablations:
      lrs = chosen_lrs(runner.runs())
      if args.phase == "seeds" and len(args.lrs.split(",")) == 1 and args.lrs:
        # One --lrs value with --phase seeds: the lr of variants whose sweep is not written yet
        # (seed 0 still running in another process).
        lrs = {v: lrs.get(v, float(args.lrs)) for v in variants}
      missing = [v for v in variants if v not in lrs]
      if missing:
        raise SystemExit(f"no sweep results for {missing}: run --phase sweep first")
    if args.phase in ("seeds", "all"):
      for seed in seeds:
        for v in variants:
          runner.run(v, {}, lrs[v], seed, tag="seeds", force=args.force)
    for name in ablations:
      for seed in seeds:
        for v, overrides in ABLATIONS[name]:
          wanted = [x for x in args.values.split(",") if x]
          if wanted and not any(str(value) in wanted for value in overrides.values()):
            continue
          if v in variants:
            runner.run(v, overrides, lrs[v], seed, tag=f"ablation:{name}", force=args.force)
    print(f"done in {time.perf_counter() - started:.0f} s", flush=True)
  print(report(args.out, plot=not args.no_plot))
  return 0


if __name__ == "__main__":
  sys.exit(main())
