"""Parameter and optimizer-state memory of the GaLore paper's LLaMA presets (paper Table 2).

Everything is computed from ``jax.eval_shape`` (no allocation, so 7B runs on a laptop), with the
breakdown of :func:`ngalore_jax.optimizer_state_bytes`. With ``--fsdp N`` it adds the per-device
optimizer state when parameters are split over N devices (FSDP), using the shardings that
:func:`ngalore_jax.state_shardings` assigns; with ``--compiled`` it adds XLA's own
``memory_analysis()`` of the compiled full train step (forward, backward, optimizer update) for
the presets named in ``--compiled-presets``.

With ``--fit PRESET`` it instead compiles the whole train step of that preset for one device
(or, with ``--fsdp N``, per device of N) as it would run on an accelerator of limited memory:
bfloat16 weights and compute, activation checkpointing per block, batch 1, ``--seq`` tokens,
and each layer's optimizer update applied as soon as its gradient exists
(:mod:`train.per_layer`); it prints XLA's memory analysis for AdamW, 8-bit AdamW, GaLore 8-bit
and Natural GaLore 8-bit, one line each ending ``peak N GiB``. ``--mechanism xla`` compiles the
plain step instead (``value_and_grad``, ``tx.update``, ``apply_updates``; no clipping), to see
what XLA's scheduling alone does with it; ``--fit-dtype float32`` and ``--layers N`` give
cheaper variants of the same step (the figures are XLA:CPU's; see :mod:`train.per_layer` for
the float32 weight copies it makes for bfloat16 matmuls).

Run:  python -m benchmarks.memory [--presets 60m,1b,7b] [--fsdp 8] [--compiled]
      python -m benchmarks.memory --fit 7b [--seq 2048] [--fsdp 8] [--mechanism xla]
"""

import argparse
import json
import math
import os
import pathlib
import sys

_FLAGS = []
if "--fsdp" in sys.argv:  # fake CPU devices must be requested before jax is imported
  _FLAGS.append(f"--xla_force_host_platform_device_count={sys.argv[sys.argv.index('--fsdp') + 1]}")
if "--fit" in sys.argv:
  # Only the machine-code generation is made cheaper: memory_analysis() comes from the HLO
  # schedule and buffer assignment, which this flag does not touch (same bytes, 1.5x faster).
  _FLAGS.append("--xla_backend_optimization_level=0")
if _FLAGS:
  os.environ.setdefault("XLA_FLAGS", " ".join(_FLAGS))

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ngalore_jax as ng
from models import llama
from train import optimizers as train_optimizers
from train import per_layer
from train import steps

PAPER_RANKS = {"60m": 128, "130m": 256, "350m": 256, "1b": 512, "7b": 1024}
GIB = 1024 ** 3
MIB = 1024 ** 2


#: label -> (registered optimizer, its options besides the rank): each at its defaults.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "optax.contrib.galore": ("optax_galore", {}),
    "ng.galore": ("galore", {}),
    "ng.galore (std: galore-torch's side)": ("galore", {"proj_type": "std"}),
    "ng.galore (full)": ("galore", {"proj_type": "full"}),
    "ng.natural_galore": ("natural_galore", {}),
    # The paper's setting: the smaller side, a float32 history of 10.
    "ng.natural_galore (std, float32 history 10)": (
        "natural_galore", {"proj_type": "std", "history_dtype": "float32", "history_size": 10}),
    "ng.natural_galore (std, bf16 history 10)": (
        "natural_galore", {"proj_type": "std", "history_dtype": "bfloat16", "history_size": 10}),
    "ng.natural_galore (std, int8 history 10)": (
        "natural_galore", {"proj_type": "std", "history_dtype": "int8", "history_size": 10}),
    "ng.natural_galore (float32 history 10)": (
        "natural_galore", {"history_dtype": "float32", "history_size": 10}),
    "ng.natural_galore (Kronecker)": ("natural_galore", {"preconditioner": "kronecker"}),
    "ng.natural_galore (std, Kronecker)": (
        "natural_galore", {"proj_type": "std", "preconditioner": "kronecker"}),
    "ng.natural_galore (authors' code settings)": ("natural_galore_official", {}),
    "ng.fira": ("fira", {}),
    "ng.apollo": ("apollo", {}),
    "ng.apollo_mini": ("apollo_mini", {}),
    # Reparametrised baselines: params are what they hold (factors / base + adapters), the state
    # is AdamW's over their trainable part (train.low_rank, train.relora).
    "low_rank": ("low_rank", {}),
    "relora": ("relora", {}),
    "lora": ("lora", {}),
}


def _config(name: str, options: dict[str, Any], rank: int):
  """The registry's config of ``name`` with ``options``, at ``rank`` if it takes one."""
  fields = {f.name for f in dataclasses.fields(train_optimizers.REGISTRY[name])}
  return train_optimizers.make(name, **options, **({"rank": rank} if "rank" in fields else {}))


def optimizers(rank: int) -> dict[str, optax.GradientTransformation]:
  """The optimizers compared, built by the trainer's registry at the paper's rank."""
  return {label: _config(name, options, rank).build(1e-3)
          for label, (name, options) in VARIANTS.items()}


def parametrizations(rank: int) -> dict[str, Any]:
  """label -> the variant's ``train.lora.Parametrization`` (``None``: it trains the params)."""
  return {label: _config(name, options, rank).parametrization()
          for label, (name, options) in VARIANTS.items()}


def per_device_bytes(tx, abstract_params, mesh):
  """Largest per-device optimizer-state bytes when params are FSDP-sharded over ``mesh``."""
  specs = llama.partition_specs(abstract_params, strategy="fsdp", fsdp_axis="fsdp")
  sharded = jax.tree.map(
      lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype,
                                        sharding=jax.sharding.NamedSharding(mesh, s)),
      abstract_params, specs)
  shardings = ng.state_shardings(tx, sharded)
  state = jax.eval_shape(tx.init, abstract_params)
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    shard = sharding.shard_shape(leaf.shape)
    total += jnp.dtype(leaf.dtype).itemsize * math.prod(shard)
  return total


def compiled_step_memory(tx, graphdef, abstract_params, batch, seq):
  """XLA's memory analysis of the compiled train step (nothing is allocated)."""

  abstract_state = jax.eval_shape(
      lambda p: steps.TrainState(jnp.zeros((), jnp.int32), p, tx.init(p), jax.random.PRNGKey(0)),
      abstract_params)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  train_step = steps.make_train_step(graphdef, tx, optax.constant_schedule(1e-3))
  compiled = jax.jit(train_step, donate_argnums=0).lower(abstract_state, tokens).compile()
  return memory_analysis_bytes(compiled)


def memory_analysis_bytes(compiled):
  """XLA's ``memory_analysis()`` of a compiled function, in bytes, with a peak estimate.

  The peak estimate is arguments plus outputs, less the donated (aliased) buffers, plus
  temporaries. Also used by ``benchmarks.finetune`` on the trainer's own compiled step.
  """
  analysis = compiled.memory_analysis()
  return {
      "argument_bytes": analysis.argument_size_in_bytes,
      "output_bytes": analysis.output_size_in_bytes,
      "temp_bytes": analysis.temp_size_in_bytes,
      "alias_bytes": analysis.alias_size_in_bytes,
      "peak_estimate_bytes": (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                              - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes),
  }


#: label -> (registered optimizer, its options besides the rank): the ``--fit`` table's rows.
FIT_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "adamw": ("adamw", {}),
    "adamw 8-bit": ("adamw_8bit", {}),
    "galore 8-bit": ("galore", {"adam_8bit": 1}),
    "natural_galore 8-bit": ("natural_galore", {"adam_8bit": 1}),
}

FIT_MECHANISMS = ("per_layer", "xla")


def fit_config(preset: str, dtype: str = "bfloat16",
               num_layers: int | None = None) -> llama.LlamaConfig:
  """``preset`` as ``--fit`` compiles it: ``dtype`` weights and compute (bfloat16 unless
  given), blocks rematerialised, optionally fewer blocks."""
  config = llama.CONFIGS[preset]
  return dataclasses.replace(config, dtype=dtype, param_dtype=dtype, remat=True,
                             num_layers=num_layers or config.num_layers)


def _plain_step(graphdef, tx):
  """The plain step: the whole gradient, then the whole update (no clipping, no metrics)."""

  def train_step(state, batch):
    loss, grads = jax.value_and_grad(steps.cross_entropy, argnums=1)(graphdef, state.params,
                                                                     batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return steps.TrainState(state.step + 1, params, opt_state, state.rng), loss

  return train_step


def _shard_bytes(abstract, shardings=None) -> int:
  """Bytes of a tree of abstract arrays, per device when ``shardings`` are given."""
  leaves = jax.tree.leaves(abstract)
  if shardings is None:
    return sum(jnp.dtype(x.dtype).itemsize * math.prod(x.shape) for x in leaves)
  return sum(jnp.dtype(x.dtype).itemsize * math.prod(s.shard_shape(x.shape))
             for x, s in zip(leaves, jax.tree.leaves(shardings)))


def fit_step_memory(config: llama.LlamaConfig, tx: optax.GradientTransformation, *,
                    seq: int, batch: int = 1, mechanism: str = "per_layer",
                    mesh: Any = None) -> dict[str, Any]:
  """XLA's memory analysis of one compiled train step of ``config`` (nothing is allocated).

  Args:
    config: the model (see :func:`fit_config`).
    tx: the optimizer (no clipping).
    seq: tokens per sequence.
    batch: sequences per step.
    mechanism: ``"per_layer"`` (:func:`train.per_layer.make_train_step`) or ``"xla"`` (the plain
      step, leaving the order of the work to XLA).
    mesh: a one-axis ``("fsdp",)`` mesh to shard parameters and state over (FSDP, as
      :func:`models.llama.partition_specs` and :func:`ngalore_jax.state_shardings` place them);
      the figures are then per device.

  Returns:
    Weight and state bytes (per device), :func:`memory_analysis_bytes` and the compile time.
  """
  if mechanism not in FIT_MECHANISMS:
    raise ValueError(f"mechanism must be one of {FIT_MECHANISMS}, got {mechanism!r}")
  graphdef, params = llama.abstract_params(config)
  if mechanism == "per_layer":
    init, train_step = per_layer.init, per_layer.make_train_step(
        graphdef, tx, optax.constant_schedule(1e-3))
  else:
    init, train_step = (lambda t, p: t.init(p)), _plain_step(graphdef, tx)
  state = jax.eval_shape(
      lambda p: steps.TrainState(jnp.zeros((), jnp.int32), p, init(tx, p),
                                 jax.random.PRNGKey(0)), params)
  tokens = jax.ShapeDtypeStruct((batch, seq + 1), jnp.int32)
  jitted = jax.jit(train_step, donate_argnums=0)
  param_shardings = state_shardings = None
  if mesh is not None:
    specs = llama.partition_specs(params, strategy="fsdp", fsdp_axis="fsdp")
    param_shardings = jax.tree.map(lambda s: jax.sharding.NamedSharding(mesh, s), specs)
    sharded = jax.tree.map(
        lambda p, s: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=s), params, param_shardings)
    if mechanism == "per_layer":  # one state per part, each placed as for its own params
      parts = per_layer.split_parts(sharded)
      opt_shardings = {"embed": ng.state_shardings(tx, parts["embed"]),
                       "blocks": tuple(ng.state_shardings(tx, b) for b in parts["blocks"]),
                       "head": ng.state_shardings(tx, parts["head"])}
    else:
      opt_shardings = ng.state_shardings(tx, sharded)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state_shardings = steps.TrainState(replicated, param_shardings, opt_shardings, replicated)
    jitted = jax.jit(train_step, donate_argnums=0, in_shardings=(state_shardings, replicated),
                     out_shardings=(state_shardings, replicated))
  start = time.perf_counter()
  compiled = jitted.lower(state, tokens).compile()
  seconds = time.perf_counter() - start
  return {
      "weight_bytes": _shard_bytes(state.params, param_shardings),
      "state_bytes": _shard_bytes(state.opt_state,
                                  None if state_shardings is None else state_shardings.opt_state),
      **memory_analysis_bytes(compiled),
      "compile_seconds": round(seconds, 1),
  }


def fit_line(row: dict[str, Any]) -> str:
  """One ``--fit`` row as text, ending ``peak N GiB``."""
  where = f"FSDP {row['fsdp']}, per device" if row["fsdp"] else "1 device"
  return (f"{row['preset']} seq {row['seq']} batch {row['batch']} ({where}, {row['mechanism']}) "
          f"| {row['optimizer']:<20} | weights {row['weight_bytes'] / GIB:.2f} GiB | state "
          f"{row['state_bytes'] / GIB:.2f} GiB | temporaries {row['temp_bytes'] / GIB:.2f} GiB "
          f"| peak {row['peak_estimate_bytes'] / GIB:.2f} GiB")


def fit(preset: str, *, seq: int, batch: int = 1, fsdp: int = 0, mechanism: str = "per_layer",
        config: llama.LlamaConfig | None = None, rank: int | None = None,
        variants: dict[str, tuple[str, dict[str, Any]]] | None = None) -> list[dict[str, Any]]:
  """The ``--fit`` rows of ``preset`` (``config`` and ``rank`` override the preset's)."""
  config = fit_config(preset) if config is None else config
  rank = PAPER_RANKS[preset] if rank is None else rank
  preset = preset if config.num_layers == llama.CONFIGS.get(preset, config).num_layers else (
      f"{preset} ({config.num_layers} layers)")
  if config.param_dtype != "bfloat16":
    preset += f" {config.param_dtype}"
  mesh = jax.make_mesh((fsdp,), ("fsdp",)) if fsdp else None
  rows = []
  for label, (name, options) in (FIT_VARIANTS if variants is None else variants).items():
    tx = _config(name, options, rank).build(1e-3)
    row = {"preset": preset, "seq": seq, "batch": batch, "fsdp": fsdp, "mechanism": mechanism,
           "rank": rank, "optimizer": label,
           **fit_step_memory(config, tx, seq=seq, batch=batch, mechanism=mechanism, mesh=mesh)}
    print(fit_line(row), flush=True)
    rows.append(row)
  return rows


def _write_fit(rows, out):
  """Adds ``rows`` to the JSON file ``out``, replacing rows of the same setting."""
  key = lambda r: (r["preset"], r["seq"], r["batch"], r["fsdp"], r["mechanism"], r["optimizer"])
  out = pathlib.Path(out)
  old = json.loads(out.read_text()) if out.exists() else []
  new = {key(r) for r in rows}
  merged = [r for r in old if key(r) not in new] + rows
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(merged, indent=1))
  print(f"\nwrote {out}")


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="60m,130m,350m,1b,7b")
  parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--fsdp", type=int, default=0, help="also report per-device state on N devices")
  parser.add_argument("--compiled", action="store_true", help="add XLA memory_analysis of the step")
  parser.add_argument("--compiled-presets", default="60m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--out", default=None,
                      help="default: benchmarks/results/memory.json (memory_fit_<preset>.json "
                      "with --fit)")
  parser.add_argument("--fit", default=None, metavar="PRESET",
                      help="compile PRESET's bf16, rematerialised train step at batch 1 and "
                      "print its memory per optimizer (--seq, --fsdp, --mechanism)")
  parser.add_argument("--seq-len", dest="seq", type=int, default=argparse.SUPPRESS,
                      help="alias of --seq")
  parser.add_argument("--mechanism", default="per_layer", choices=FIT_MECHANISMS)
  parser.add_argument("--fit-dtype", default="bfloat16", choices=["float32", "bfloat16"])
  parser.add_argument("--layers", type=int, default=None, help="--fit with fewer blocks")
  parser.add_argument("--optimizers", default=",".join(FIT_VARIANTS),
                      help="--fit rows, comma-separated labels of FIT_VARIANTS")
  args = parser.parse_args(argv)

  if args.fit:
    print(f"Train step of {args.fit} ({args.fit_dtype}, remat, batch 1): XLA memory_analysis; peak = "
          "arguments + outputs - donated + temporaries\n", flush=True)
    rows = fit(args.fit, seq=args.seq, fsdp=args.fsdp, mechanism=args.mechanism,
               config=fit_config(args.fit, args.fit_dtype, args.layers),
               variants={k: FIT_VARIANTS[k] for k in args.optimizers.split(",")})
    _write_fit(rows, args.out or f"benchmarks/results/memory_fit_{args.fit}.json")
    return
  args.out = args.out or "benchmarks/results/memory.json"

  mesh = jax.make_mesh((args.fsdp,), ("fsdp",)) if args.fsdp else None
  rows = []
  for preset in args.presets.split(","):
    config = dataclasses.replace(llama.CONFIGS[preset], param_dtype=args.param_dtype)
    graphdef, params = llama.abstract_params(config)
    rank = PAPER_RANKS[preset]
    reparametrised = parametrizations(rank)
    for name, tx in optimizers(rank).items():
      parametrization = reparametrised[name]
      if parametrization is None:
        held, trainable = params, params
      else:  # the held tree replaces the params; the optimizer sees its trainable part only
        held = jax.eval_shape(parametrization.init, params, jax.random.PRNGKey(0))
        trainable = parametrization.split(held)[0]
      state = jax.eval_shape(tx.init, trainable)
      row = {"preset": preset, "rank": rank, "param_dtype": args.param_dtype,
             "optimizer": name, "param_bytes": ng.tree_bytes(held),
             **ng.optimizer_state_bytes(state)}
      # FSDP and XLA figures of a reparametrised step are not computed (plain params only).
      if mesh is not None and parametrization is None:
        row["per_device_state_bytes"] = per_device_bytes(tx, params, mesh)
      if (args.compiled and preset in args.compiled_presets.split(",")
          and parametrization is None):
        row.update({f"xla_{k}": v for k, v in compiled_step_memory(
            tx, graphdef, params, args.batch, args.seq).items()})
      rows.append(row)
      print(f"  measured {preset} {name}", file=sys.stderr)

  print_tables(rows, mesh)
  out = pathlib.Path(args.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(rows, indent=1))
  print(f"\nwrote {out}")


def print_tables(rows, mesh):
  unit, unit_name = (GIB, "GiB")
  header = ("| preset (rank) | optimizer | params | state total | x AdamW | x ng.galore | "
            "projectors | inner (low-rank) | history | curvature | full-rank rest |")
  if mesh is not None:
    header += f" state per device (FSDP {mesh.devices.size}) |"
  print(f"\nOptimizer-state memory ({unit_name}, params in {rows[0]['param_dtype']}; "
        "jax.eval_shape, nothing allocated)\n")
  print(header)
  print("|" + "---|" * (header.count("|") - 1))
  adamw = {r["preset"]: r["total"] for r in rows if r["optimizer"] == "adamw"}
  galore = {r["preset"]: r["total"] for r in rows if r["optimizer"] == "ng.galore"}
  for r in rows:
    # The breakdown only understands ngalore_jax's own state types.
    part = ((lambda k: f"{r[k] / unit:.3f}") if r["optimizer"].startswith("ng.")
            else (lambda k: "-"))
    cells = [f"{r['preset']} ({r['rank']})", r["optimizer"], f"{r['param_bytes'] / unit:.3f}",
             f"{r['total'] / unit:.3f}", f"{r['total'] / adamw[r['preset']]:.2f}",
             f"{r['total'] / galore[r['preset']]:.2f}" if r["preset"] in galore else "-",
             part("projectors"), part("inner_state"), part("history"), part("curvature"),
             part("other")]
    if mesh is not None:
      per_device = r.get("per_device_state_bytes")
      cells.append("-" if per_device is None else f"{per_device / unit:.3f}")
    print("| " + " | ".join(cells) + " |")
  if any("xla_temp_bytes" in r for r in rows):
    print("\nXLA memory_analysis of the compiled train step (MiB)\n")
    print("| preset | optimizer | arguments | outputs | aliased | temporaries | peak estimate |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
      if "xla_temp_bytes" in r:
        print(f"| {r['preset']} | {r['optimizer']} | {r['xla_argument_bytes'] / MIB:.1f} | "
              f"{r['xla_output_bytes'] / MIB:.1f} | {r['xla_alias_bytes'] / MIB:.1f} | "
              f"{r['xla_temp_bytes'] / MIB:.1f} | {r['xla_peak_estimate_bytes'] / MIB:.1f} |")


if __name__ == "__main__":
  main()
