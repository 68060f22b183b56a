"""Every optimizer side by side: held-out loss at equal steps and seeds, and optimizer-state memory.

Joins two results files that other commands write, and computes nothing new:

* the convergence benchmark's runs (``python -m benchmarks.convergence``; ``--setting`` picks the
  file): per variant, the final held-out loss at its chosen lr (the best of its sweep, seed 0),
  mean ± std over the seeds it has, and the paired difference to a base variant on the same
  seeds (same seed = same initialisation and data order);
* ``benchmarks/results/memory.json`` (``python -m benchmarks.memory``): the optimizer state of
  the same optimizer, configured as the variant is, at the LLaMA presets 60M, 1B and 7B (the
  paper's ranks), in GiB, and relative to AdamW's.

Run:  python -m benchmarks.summary                      # the small setting, paired with galore
      python -m benchmarks.summary --setting d256 --base galore_reverse
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys
from typing import Any, Optional

from benchmarks import _common
from benchmarks import convergence

#: convergence variant -> the ``benchmarks.memory`` row with the same optimizer settings
#: (refresh policy and learning rate do not change the state). ``None``: no such row.
MEMORY_ROWS: dict[str, Optional[str]] = {
    "adamw": "adamw",
    "optax_galore": "optax.contrib.galore",
    "galore": "ng.galore (std: galore-torch's side)",
    "galore_reverse": "ng.galore",
    "galore_defaults": "ng.galore",
    "galore_full": "ng.galore (full)",
    "natural_galore_paper": "ng.natural_galore (std, float32 history 10)",
    "natural_galore_sqrt": "ng.natural_galore (std, float32 history 10)",
    "natural_galore_paper_bf16": "ng.natural_galore (std, bf16 history 10)",
    "natural_galore_paper_int8": "ng.natural_galore (std, int8 history 10)",
    "natural_galore_official": "ng.natural_galore (authors' code settings)",
    "natural_galore_kronecker": "ng.natural_galore (Kronecker)",
    "natural_galore_reverse_int8": "ng.natural_galore",
    "natural_galore_reverse": "ng.natural_galore (float32 history 10)",
    "natural_galore_defaults": "ng.natural_galore",
    "galore_reverse_rotate": "ng.galore",
    "natural_galore_reverse_int8_rotate": "ng.natural_galore",
    "natural_galore_full_int8": "ng.natural_galore (full, int8 history 4)",
    "fira": "ng.fira",
    "apollo": "ng.apollo",
    "apollo_mini": "ng.apollo_mini",
    "lora": "lora",
    "relora": "relora",
    "low_rank": "low_rank",
}
PRESETS = ("60m", "1b", "7b")
GIB = 1024 ** 3


def _mean_std(values: list[float]) -> str:
  if len(values) == 1:
    return f"{values[0]:.4f}"
  return f"{statistics.fmean(values):.4f} ± {statistics.stdev(values):.4f}"


def table(runs: dict[str, Any], memory: list[dict[str, Any]], base: str) -> str:
  """The markdown table: one row per variant with runs at its chosen lr."""
  lrs = convergence.chosen_lrs(runs)
  if base not in lrs:
    raise SystemExit(f"no runs of the base variant {base!r}; have {sorted(lrs)}")
  by_seed = {v: {s: convergence.final_loss(r)
                 for s, r in convergence.runs_at(runs, v, {}, lrs[v]).items()}
             for v in lrs}
  state = {(r["preset"], r["optimizer"]): r["total"] for r in memory}
  rows = []
  for variant in sorted(by_seed, key=lambda v: statistics.fmean(by_seed[v].values())):
    losses = by_seed[variant]
    paired = [losses[s] - by_seed[base][s] for s in sorted(losses) if s in by_seed[base]]
    if variant == base:
      delta = "-"
    elif paired:
      wins = sum(d < 0 for d in paired)
      sign = "+" if statistics.fmean(paired) > 0 else ""
      delta = f"{sign}{_mean_std(paired)} ({wins}/{len(paired)} better)"
    else:
      delta = "no shared seed"
    label = MEMORY_ROWS.get(variant)
    cells = []
    for preset in PRESETS:
      total, adamw = state.get((preset, label)), state.get((preset, "adamw"))
      cells.append("-" if total is None or adamw is None
                   else f"{total / GIB:.2f} ({total / adamw:.2f}x)")
    rows.append([variant, f"{lrs[variant]:g}", len(losses), _mean_std(list(losses.values())),
                 delta] + cells)
  return _common.markdown_table(
      ["variant", "lr", "seeds", "held-out loss", f"Δ vs {base} (paired)"]
      + [f"state {p} GiB (x AdamW)" for p in PRESETS], rows)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--setting", choices=tuple(convergence.SETTINGS), default="small")
  parser.add_argument("--convergence", type=pathlib.Path, default=None,
                      help="convergence results JSON (default: the setting's file)")
  parser.add_argument("--memory", type=pathlib.Path,
                      default=_common.RESULTS_DIR / "memory.json")
  parser.add_argument("--base", default="galore", help="the variant deltas are paired with")
  args = parser.parse_args(argv)
  path = args.convergence or _common.RESULTS_DIR / convergence.SETTINGS[args.setting][1]
  runs = _common.read_json(path).get("runs", {})
  memory = json.loads(args.memory.read_text())
  print(f"{path.name}, paired with {args.base}; state: {args.memory.name}\n")
  print(table(runs, memory, args.base))
  return 0


if __name__ == "__main__":
  sys.exit(main())
