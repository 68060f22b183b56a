"""Step time and tokens/s of the full jitted train step, per optimizer, plus SVD refresh costs.

The step is the trainer's own (:func:`train.train_steps.make_train_step`: forward, backward, clipping,
optimizer update, parameter update), jitted, for each optimizer at the ``tiny`` and ``60m``
presets (32k vocabulary) with a small batch so that it runs on a CPU:

* ``adamw``; ``optax.contrib.galore``; ``ng.galore`` with exact and with randomized SVD;
  ``ng.natural_galore`` at its defaults and in the paper's setting (``std``, float32 history 10).
* The **ordinary** step and the **refresh** step (the one that recomputes every projector by
  SVD) are timed separately. Both run the same compiled executable: the refresh is a
  ``lax.cond`` on the optimizer's step counter, so timing the step on the initial state
  (count 0) measures a refresh and on the state after one step (count 1) an ordinary step.
  The amortised step over ``update_proj_gap`` steps is ``ordinary + (refresh - ordinary) / T``.
* Optimizers are interleaved call by call (their order rotated every round), as in training
  the state is donated to the step, every number is the median over rounds (with the minimum
  beside it: on a shared CPU the minimum is the least disturbed estimate), and each ratio is to
  AdamW measured in the same run.
* The raw cost of the SVD of one ``--svd-shape`` matrix (default 2048 x 5461, a LLaMA-1B MLP
  kernel): exact thin SVD vs the randomized range finder at rank ``--svd-rank``, and the share
  of the exact top-r subspace's energy that the randomized one captures.

MFU needs a peak FLOP/s figure: known accelerators are looked up (``train.metrics``), on a CPU
it is n/a unless ``--peak-tflops`` is given; achieved GFLOP/s (from
``LlamaConfig.flops_per_token``) is always reported.

Run:  python -m benchmarks.speed [--presets tiny,60m] [--batch-size 2] [--seq-len 128]
"""

from __future__ import annotations

import os

# LAPACK (the SVD of a projector refresh) runs in OpenBLAS, whose worker threads spin-wait: on a
# CPU shared with other processes one 512 x 1376 SVD took 4-14 s with its default threads and
# 0.09 s with one. Set before jax (and its LAPACK) is imported; export the variable to override.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse  # pylint: disable=g-import-not-at-top,wrong-import-position
import dataclasses
import pathlib
import sys
import time
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import _common

#: label -> (optimizer for ``_common.build_optimizer``, its options).
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "optax.contrib.galore": ("optax_galore", {}),
    "ng.galore (exact SVD)": ("galore", {"svd_method": "exact"}),
    "ng.galore (randomized SVD)": ("galore", {"svd_method": "randomized"}),
    "ng.natural_galore (exact SVD)": ("natural_galore", {"svd_method": "exact"}),
    # The paper's setting (the library's default until the defaults were measured).
    "ng.natural_galore (std, float32 history 10)": (
        "natural_galore", {"svd_method": "exact", "proj_type": "std", "history_size": 10,
                           "history_dtype": "float32"}),
}

#: The GaLore paper's rank per preset (tiny: a quarter of its width).
RANKS = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def _model_config(preset: str, overrides: dict[str, Any]):
  from models import llama  # pylint: disable=import-outside-toplevel
  return dataclasses.replace(llama.CONFIGS[preset], **overrides)


def bench_preset(preset: str, *, batch_size: int, seq_len: int, rank: int, gap: int,
                 repeats: int, variants: list[str], peak_flops: Optional[float],
                 model_overrides: dict[str, Any]) -> dict[str, Any]:
  """Times every optimizer's ordinary and refresh step on one preset; returns a JSON record.

  Each of the ``repeats`` rounds times, for every optimizer in turn (the order rotated per
  round), one ordinary step and one refresh step. As in training, the state is donated to the
  step: each timed call gets a fresh copy of the count-0 (refresh) or count-1 (ordinary) state,
  made outside the timed region.
  """
  from models import llama  # pylint: disable=import-outside-toplevel
  from train import steps as train_steps  # pylint: disable=import-outside-toplevel

  cfg = _model_config(preset, model_overrides)
  graphdef, params = llama.init_params(cfg, 0)
  rng = np.random.default_rng(0)
  batch = jnp.asarray(rng.integers(0, cfg.vocab_size, (batch_size, seq_len + 1)), jnp.int32)
  schedule = optax.constant_schedule(1e-3)
  tokens = batch_size * seq_len
  flops = cfg.flops_per_token(seq_len) * tokens
  copy = jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))

  steps, states, compile_sec = {}, {}, {}
  for label in variants:
    name, options = VARIANTS[label]
    tx = _common.build_optimizer(
        name, schedule, **_common.taken_options(name, rank=rank, update_proj_gap=gap), **options)
    fn = jax.jit(train_steps.make_train_step(graphdef, tx, schedule), donate_argnums=0)
    state0 = train_steps.TrainState(jnp.zeros((), jnp.int32), copy(params), tx.init(params),
                                    jax.random.PRNGKey(0))
    start = time.perf_counter()
    compiled = fn.lower(state0, batch).compile()
    compile_sec[label] = time.perf_counter() - start
    state1, _ = jax.block_until_ready(compiled(copy(state0), batch))  # count 0 -> 1
    steps[label], states[label] = compiled, (state0, state1)
    print(f"  {preset}: compiled {label} in {compile_sec[label]:.1f} s", flush=True)

  def timed(fn, state):
    fresh = jax.block_until_ready(copy(state))
    return _common.time_call(lambda: fn(fresh, batch), 1)

  ordinary = {label: [] for label in variants}
  refresh = {label: [] for label in variants}
  for rep in range(repeats):
    order = variants[rep % len(variants):] + variants[:rep % len(variants)]
    for label in order:
      fn, (state0, state1) = steps[label], states[label]
      ordinary[label] += timed(fn, state1)
      refresh[label] += timed(fn, state0)
  print(f"  {preset}: {repeats} rounds timed", flush=True)

  def summary(times_by_label, stat):
    return {label: stat(t) for label, t in times_by_label.items()}

  rows = []
  for label in variants:
    row = {"optimizer": label, "compile_sec": compile_sec[label],
           "ordinary_times_ms": [1e3 * t for t in ordinary[label]],
           "refresh_times_ms": [1e3 * t for t in refresh[label]]}
    for suffix, stat in (("", _common.median), ("_min", min)):
      t_ord = summary(ordinary, stat)[label]
      t_ref = summary(refresh, stat)[label]
      base = summary(ordinary, stat).get("adamw")
      projected = label != "adamw"
      extra = max(t_ref - t_ord, 0.0) if projected else 0.0
      amortised = t_ord + extra / gap
      row.update({
          f"step_ms{suffix}": 1e3 * t_ord,
          f"refresh_step_ms{suffix}": 1e3 * t_ref if projected else None,
          f"refresh_extra_ms{suffix}": 1e3 * extra if projected else None,
          f"amortised_step_ms{suffix}": 1e3 * amortised,
          f"tokens_per_sec{suffix}": tokens / amortised,
          f"gflops_per_sec{suffix}": flops / amortised / 1e9,
          f"mfu{suffix}": flops / amortised / peak_flops if peak_flops else None,
          f"step_vs_adamw{suffix}": t_ord / base if base else None,
          f"amortised_vs_adamw{suffix}": amortised / base if base else None,
      })
    rows.append(row)
  return {"preset": preset, "model": dataclasses.asdict(cfg), "num_params": cfg.num_params(),
          "batch_size": batch_size, "seq_len": seq_len, "tokens_per_step": tokens,
          "flops_per_step": flops, "rank": rank, "update_proj_gap": gap, "repeats": repeats,
          "rows": rows}


def bench_svd(shape: tuple[int, int], rank: int, repeats: int) -> dict[str, Any]:
  """Exact thin SVD vs randomized top-``rank`` subspace of one ``shape`` float32 matrix.

  The matrix has a decaying spectrum (``X diag(1/k) Y`` plus noise), like a gradient, so the
  captured-energy figure means something; timings do not depend on the spectrum.
  """
  from ngalore_jax import _subspace  # pylint: disable=import-outside-toplevel

  m, n = shape
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  inner = min(m, n)
  decay = 1.0 / jnp.arange(1, inner + 1, dtype=jnp.float32)
  matrix = jax.jit(lambda: (jax.random.normal(k1, (m, inner)) * decay) @ jax.random.normal(
      k2, (inner, n)) / jnp.sqrt(n) + 1e-3 * jax.random.normal(k3, (m, n)))()
  matrix = jax.block_until_ready(matrix)
  exact = jax.jit(lambda a: _subspace.top_left_singular_vectors(a, rank, method="exact"))
  randomized = jax.jit(lambda a, key: _subspace.top_left_singular_vectors(
      a, rank, method="randomized", key=key))
  key = jax.random.key(1)
  jax.block_until_ready((exact(matrix), randomized(matrix, key)))  # compile
  times = {"exact": [], "randomized": []}
  for _ in range(repeats):
    times["exact"] += _common.time_call(lambda: exact(matrix), 1)
    times["randomized"] += _common.time_call(lambda: randomized(matrix, key), 1)
  u, q = exact(matrix), randomized(matrix, key)
  energy = lambda basis: float(jnp.sum((basis.T @ matrix) ** 2))
  return {
      "shape": [m, n], "rank": rank, "repeats": repeats,
      "exact_ms": 1e3 * _common.median(times["exact"]),
      "randomized_ms": 1e3 * _common.median(times["randomized"]),
      "speedup": _common.median(times["exact"]) / _common.median(times["randomized"]),
      "randomized_captured_energy_vs_exact": energy(q) / energy(u),
      "oversampling": 8, "power_iterations": 2,
      "times_ms": {k: [1e3 * t for t in v] for k, v in times.items()},
  }


def _fmt(value, pattern="{:.1f}"):
  return "-" if value is None else pattern.format(value)


def report(results: dict[str, Any]) -> str:
  """Markdown tables of a results dict (as saved in the JSON)."""
  parts = []
  for p in results.get("presets", []):
    rows = []
    for r in p["rows"]:
      both = lambda key, pattern="{:.0f}": (
          "-" if r[key] is None else f"{pattern.format(r[key])} ({pattern.format(r[key + '_min'])})")
      rows.append([r["optimizer"], both("step_ms"), both("refresh_step_ms"),
                   both("amortised_step_ms"), both("tokens_per_sec"),
                   both("amortised_vs_adamw", "{:.2f}x"), both("gflops_per_sec"),
                   _fmt(r["mfu"], "{:.1%}") if r["mfu"] else "n/a (CPU)",
                   _fmt(r["compile_sec"])])
    parts.append(
        f"**{p['preset']}** ({p['num_params'] / 1e6:.1f}M params, batch {p['batch_size']} x seq "
        f"{p['seq_len']} = {p['tokens_per_step']} tokens/step, rank {p['rank']}, amortised over "
        f"update_proj_gap={p['update_proj_gap']}). Median (min) of {p['repeats']} interleaved "
        "rounds.\n\n"
        + _common.markdown_table(
            ["optimizer", "step ms", "refresh step ms", "amortised ms", "tokens/s",
             "amortised / adamw", "GFLOP/s", "MFU", "compile s"], rows))
  s = results.get("svd")
  if s:
    parts.append(_common.markdown_table(
        ["matrix", "rank", "exact SVD ms", "randomized ms", "speed-up",
         "randomized energy / exact"],
        [[f"{s['shape'][0]} x {s['shape'][1]}", s["rank"],
          f"{s['exact_ms']:.0f} (min {min(s['times_ms']['exact']):.0f})",
          f"{s['randomized_ms']:.0f} (min {min(s['times_ms']['randomized']):.0f})",
          _fmt(s["speedup"], "{:.1f}x"),
          _fmt(s["randomized_captured_energy_vs_exact"], "{:.4f}")]]))
  return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--presets", default="tiny,60m")
  parser.add_argument("--optimizers", default=",".join(VARIANTS),
                      help=f"comma-separated subset of: {', '.join(VARIANTS)}")
  parser.add_argument("--batch-size", type=int, default=2)
  parser.add_argument("--seq-len", type=int, default=128)
  parser.add_argument("--rank", type=int, default=None, help="default: the paper's per preset")
  parser.add_argument("--update-proj-gap", type=int, default=200,
                      help="T of the amortised step (the library default, 200)")
  parser.add_argument("--repeats", type=int, default=7,
                      help="interleaved rounds (one ordinary and one refresh step each)")
  parser.add_argument("--override", action="append", default=[], metavar="FIELD=VALUE",
                      help="LlamaConfig field override for every preset (e.g. num_layers=1)")
  parser.add_argument("--svd-shape", default="2048x5461", help="MxN, or 'none' to skip")
  parser.add_argument("--svd-rank", type=int, default=512)
  parser.add_argument("--svd-repeats", type=int, default=3)
  parser.add_argument("--peak-tflops", type=float, default=None,
                      help="peak TFLOP/s for MFU (default: looked up; n/a on CPU)")
  parser.add_argument("--out", type=pathlib.Path, default=_common.RESULTS_DIR / "speed.json")
  parser.add_argument("--report", action="store_true", help="only print the tables of --out")
  args = parser.parse_args(argv)
  if args.report:
    print(report(_common.read_json(args.out)))
    return 0

  variants = [v for v in args.optimizers.split(",") if v]
  if any(v not in VARIANTS for v in variants):
    parser.error(f"unknown optimizer in {variants}; known: {list(VARIANTS)}")
  overrides = {}
  for item in args.override:
    key, _, value = item.partition("=")
    overrides[key] = int(value) if value.lstrip("-").isdigit() else value
  from train import metrics  # pylint: disable=import-outside-toplevel
  peak = (args.peak_tflops * 1e12 if args.peak_tflops
          else metrics.peak_flops_per_device(jax.devices()[0].device_kind))

  results: dict[str, Any] = {"machine": _common.machine_info(), "peak_flops": peak,
                             "presets": [], "svd": None}
  started = time.perf_counter()
  for preset in [p for p in args.presets.split(",") if p]:
    rank = args.rank or RANKS[preset]
    results["presets"].append(bench_preset(
        preset, batch_size=args.batch_size, seq_len=args.seq_len, rank=rank,
        gap=args.update_proj_gap, repeats=args.repeats, variants=variants, peak_flops=peak, model_overrides=overrides))
    _common.update_json(args.out, lambda data: data.update(results))
  if args.svd_shape != "none":
    m, n = (int(x) for x in args.svd_shape.lower().split("x"))
    print(f"  svd {m} x {n} ...", flush=True)
    results["svd"] = bench_svd((m, n), args.svd_rank, args.svd_repeats)
  results["wall_sec"] = time.perf_counter() - started
  results["machine"]["load_average_end"] = _common.machine_info()["load_average"]
  _common.update_json(args.out, lambda data: data.update(results))
  print(f"machine: {results['machine']['cpu']}, {results['machine']['cpu_count']} cores, "
        f"load average {results['machine']['load_average']}")
  print(report(results))
  return 0


if __name__ == "__main__":
  sys.exit(main())
