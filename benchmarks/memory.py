"""Parameter and optimizer-state memory of the GaLore paper's LLaMA presets (paper Table 2).

Everything is computed from ``jax.eval_shape`` (no allocation, so 7B runs on a laptop), with the
breakdown of :func:`ngalore_jax.optimizer_state_bytes`. With ``--fsdp N`` it adds the per-device
optimizer state when parameters are split over N devices (FSDP), using the shardings that
:func:`ngalore_jax.state_shardings` assigns; with ``--compiled`` it adds XLA's own
``memory_analysis()`` of the compiled full train step (forward, backward, optimizer update) for
the presets named in ``--compiled-presets``.

Run:  python -m benchmarks.memory [--presets 60m,1b,7b] [--fsdp 8] [--compiled]
"""

import argparse
import json
import math
import os
import pathlib
import sys

if "--fsdp" in sys.argv:  # fake CPU devices must be requested before jax is imported
  count = sys.argv[sys.argv.index("--fsdp") + 1]
  os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={count}")

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax

import ngalore_jax as ng
from models import llama
from train import optimizers as train_optimizers
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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--presets", default="60m,130m,350m,1b,7b")
  parser.add_argument("--param-dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--fsdp", type=int, default=0, help="also report per-device state on N devices")
  parser.add_argument("--compiled", action="store_true", help="add XLA memory_analysis of the step")
  parser.add_argument("--compiled-presets", default="60m")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--out", default="benchmarks/results/memory.json")
  args = parser.parse_args(argv)

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
