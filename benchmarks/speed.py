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
* **Collective bytes per step**: the same train step compiled as the trainer compiles it for a
  ``--collectives-mesh`` (default ``data=2,fsdp=4``) on that many CPU devices (a subprocess
  with ``--xla_force_host_platform_device_count``; nothing runs), its parameters and optimizer
  state sharded by ``train.sharding``, and the bytes each kind of collective moves per device
  counted in its HLO by ``train.sharding.collective_bytes`` (every instruction once: both
  branches of the refresh ``lax.cond`` count, so this is the refresh step's traffic, an upper
  bound on the ordinary step's). The batch is the smallest multiple of the mesh's batch split
  not below ``--batch-size``.
* The raw cost of the SVD of one ``--svd-shape`` matrix (default 2048 x 5461, a LLaMA-1B MLP
  kernel): exact thin SVD vs the randomized range finder at rank ``--svd-rank``, and the share
  of the exact top-r subspace's energy that the randomized one captures.

MFU needs a peak FLOP/s figure: known accelerators are looked up (``train.metrics``), on a CPU
it is n/a unless ``--peak-tflops`` is given; achieved GFLOP/s (from
``LlamaConfig.flops_per_token``) is always reported.

Run:  python -m benchmarks.speed [--presets tiny,60m] [--batch-size 2] [--seq-len 128]
      [--collectives-mesh data=2,fsdp=4 | none]
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
import re
import subprocess
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
    # The library's defaults: reverse_std, an int8 history of 4, exact SVD.
    "ng.natural_galore (defaults)": ("natural_galore", {}),
    # The paper's setting (the library's default until the defaults were measured).
    "ng.natural_galore (std, float32 history 10)": (
        "natural_galore", {"svd_method": "exact", "proj_type": "std", "history_size": 10,
                           "history_dtype": "float32"}),
}

#: Collective kinds in the report's order (``train.sharding.COLLECTIVES``'s names).
_COLLECTIVE_KINDS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all",
                     "collective-permute")

#: The GaLore paper's rank per preset (tiny: a quarter of its width).
RANKS = {"tiny": 64, "60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}


def split_labels(text: str) -> list[str]:
  """``--optimizers``' list: labels contain ", " (comma and space), a bare comma separates."""
  return [v for v in re.split(r",(?! )", text) if v]


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
    tx = _build_tx(label, rank, gap, schedule)
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


def _build_tx(label: str, rank: int, gap: int, schedule: optax.Schedule):
  name, options = VARIANTS[label]
  return _common.build_optimizer(
      name, schedule, **_common.taken_options(name, rank=rank, update_proj_gap=gap), **options)


def collectives_here(preset: str, *, mesh_spec: str, batch_size: int, seq_len: int, rank: int,
                     gap: int, variants: list[str],
                     model_overrides: dict[str, Any]) -> dict[str, Any]:
  """Per optimizer, bytes per collective kind of the train step compiled for ``mesh_spec``.

  Compiled as ``train.build.compile_train_step`` compiles it (parameters sharded by
  ``train.sharding.param_shardings``, optimizer state by ``train.sharding.state_shardings``,
  state donated, traced under the mesh); needs the mesh's devices in this process.
  """
  from models import llama  # pylint: disable=import-outside-toplevel
  from train import sharding  # pylint: disable=import-outside-toplevel
  from train import steps as train_steps  # pylint: disable=import-outside-toplevel

  mesh = sharding.make_mesh(mesh_spec)
  cfg = _model_config(preset, model_overrides)
  graphdef, abstract_params = llama.abstract_params(cfg)
  param_sh = sharding.param_shardings(mesh, abstract_params)
  abstract_params = sharding.with_shardings(abstract_params, param_sh)
  batch_sh = sharding.batch_sharding(mesh)
  entry = batch_sh.spec[0]
  ways = math.prod(mesh.shape[a] for a in (() if entry is None else
                                           (entry,) if isinstance(entry, str) else entry))
  batch_size = -(-batch_size // ways) * ways
  abstract_batch = jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32, sharding=batch_sh)
  schedule = optax.constant_schedule(1e-3)
  repl = sharding.replicated(mesh)
  rows = {}
  for label in variants:
    tx = _build_tx(label, rank, gap, schedule)
    state_sh = train_steps.TrainState(repl, param_sh, sharding.state_shardings(tx, abstract_params),
                                      repl)
    abstract = sharding.with_shardings(jax.eval_shape(
        lambda p, tx=tx: train_steps.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p),
                                                jax.random.PRNGKey(0)), abstract_params), state_sh)
    step = jax.jit(train_steps.make_train_step(graphdef, tx, schedule),
                   in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, repl),
                   donate_argnums=0)
    with jax.set_mesh(mesh):
      compiled = step.lower(abstract, abstract_batch).compile()
    rows[label] = sharding.collective_bytes(compiled)
    print(f"  {preset}: collectives of {label} on {mesh_spec}: "
          f"{sum(rows[label].values()) / 2**20:.1f} MiB", flush=True)
  return {"mesh": mesh_spec, "devices": math.prod(mesh.shape.values()), "batch_size": batch_size,
          "seq_len": seq_len, "bytes": rows}


def bench_collectives(preset: str, *, mesh_spec: str, **kwargs: Any) -> dict[str, Any]:
  """:func:`collectives_here` in a subprocess with as many host CPU devices as the mesh needs."""
  from train import config as train_config  # pylint: disable=import-outside-toplevel
  devices = math.prod(train_config.parse_mesh(mesh_spec).values())
  env = dict(os.environ)
  env["XLA_FLAGS"] = " ".join(
      [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
      + [f"--xla_force_host_platform_device_count={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  request = json.dumps(dict(preset=preset, mesh_spec=mesh_spec, **kwargs))
  out = subprocess.run([sys.executable, "-m", "benchmarks.speed", "--collectives-request", request],
                       env=env, check=False, capture_output=True, text=True,
                       cwd=pathlib.Path(__file__).resolve().parent.parent)
  if out.returncode:
    raise RuntimeError(f"collective-bytes subprocess failed:\n{out.stderr[-4000:]}")
  sys.stdout.write("".join(line + "\n" for line in out.stdout.splitlines()
                           if not line.startswith("{")))
  return json.loads(out.stdout.splitlines()[-1])


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
      rows.append([r["optimizer"], both("step_ms"), both("step_vs_adamw", "{:.2f}x"),
                   both("refresh_step_ms"), both("amortised_step_ms"), both("tokens_per_sec"),
                   both("amortised_vs_adamw", "{:.2f}x"), both("gflops_per_sec"),
                   _fmt(r["mfu"], "{:.1%}") if r["mfu"] else "n/a (CPU)",
                   _fmt(r["compile_sec"])])
    parts.append(
        f"**{p['preset']}** ({p['num_params'] / 1e6:.1f}M params, batch {p['batch_size']} x seq "
        f"{p['seq_len']} = {p['tokens_per_step']} tokens/step, rank {p['rank']}, amortised over "
        f"update_proj_gap={p['update_proj_gap']}). Median (min) of {p['repeats']} interleaved "
        "rounds.\n\n"
        + _common.markdown_table(
            ["optimizer", "step ms", "step / adamw", "refresh step ms", "amortised ms", "tokens/s",
             "amortised / adamw", "GFLOP/s", "MFU", "compile s"], rows))
    c = p.get("collectives")
    if c:
      kinds = [k for k in _COLLECTIVE_KINDS if any(b.get(k) for b in c["bytes"].values())]
      mib = lambda n: f"{n / 2**20:.1f}"
      parts.append(
          f"Collective bytes per step of the {p['preset']} train step on a `{c['mesh']}` mesh "
          f"({c['devices']} CPU devices, batch {c['batch_size']} x seq {c['seq_len']}): MiB per "
          "device, per kind, from the compiled HLO (both branches of the refresh count).\n\n"
          + _common.markdown_table(
              ["optimizer"] + kinds + ["total"],
              [[label] + [mib(b.get(k, 0)) for k in kinds] + [mib(sum(b.values()))]
               for label, b in c["bytes"].items()]))
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
  parser.add_argument("--collectives-mesh", default="data=2,fsdp=4",
                      help="mesh of the collective-bytes count (CPU devices), or 'none' to skip")
  parser.add_argument("--collectives-request", default=None, help=argparse.SUPPRESS)
  parser.add_argument("--report", action="store_true", help="only print the tables of --out")
  args = parser.parse_args(argv)
  if args.report:
    print(report(_common.read_json(args.out)))
    return 0
  if args.collectives_request:  # the subprocess of bench_collectives
    print(json.dumps(collectives_here(**json.loads(args.collectives_request))))
    return 0

  variants = split_labels(args.optimizers)
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
        gap=args.update_proj_gap, repeats=args.repeats, variants=variants, peak_flops=peak,
        model_overrides=overrides))
    if args.collectives_mesh != "none":
      results["presets"][-1]["collectives"] = bench_collectives(
          preset, mesh_spec=args.collectives_mesh, batch_size=args.batch_size,
          seq_len=args.seq_len, rank=rank, gap=args.update_proj_gap, variants=variants,
          model_overrides=overrides)
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
