"""The trainer's sharded train step compiles without XLA resharding through a full replica.

XLA's partitioner warns "Involuntary full rematerialization" on stderr (C++ logging) when it
cannot move an array between two shardings and replicates it instead: at scale an all-gather of
a whole activation every step. The compile runs in a subprocess with a fresh compilation cache
(a cached executable would skip the compiler and its warnings). Also: the model's activation
constraints leave its numbers unchanged, and ``train.sharding.collective_bytes`` on collectives
whose sizes are known.
"""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from models import llama
from train import sharding as sharding_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles the trainer's train step on each mesh of argv; prints its collective bytes.
_COMPILE = """
import sys
from train import build, config as config_lib, sharding
for mesh in sys.argv[1:]:
  cfg = config_lib.from_argv([
      "--mesh", mesh, "--optimizer", "adamw", "--batch-size", "8", "--seq-len", "16",
      "--override", "vocab_size=256", "--override", "hidden_size=64",
      "--override", "intermediate_size=128", "--override", "num_layers=1",
      "--override", "max_position_embeddings=16"])
  s = build.assemble(cfg, config_lib.model_config(cfg), build.make_mesh(cfg), None, None, None)
  print(mesh, sharding.collective_bytes(build.compile_train_step(s)), flush=True)
"""

MESHES = ("data=2,fsdp=4", "data=2,fsdp=2,tensor=2")


def test_train_step_compiles_without_full_rematerialization():
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE"))}
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="0", OPENBLAS_NUM_THREADS="1",
             XLA_FLAGS="--xla_force_host_platform_device_count=8",
             PYTHONPATH=os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")])))
  result = subprocess.run([sys.executable, "-c", _COMPILE, *MESHES], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert [line.split()[0] for line in result.stdout.splitlines()] == list(MESHES)
  remat = [line for line in result.stderr.splitlines()
           if "Involuntary full rematerialization" in line]
  assert not remat, "\n".join(remat)


def test_activation_constraints_keep_loss_and_gradients():
  cfg = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=1,
                          num_heads=4, num_kv_heads=2, max_position_embeddings=16)
  graphdef, params = llama.init_params(cfg, seed=0)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, 64, (8, 9)), jnp.int32)

  def loss(params, tokens):
    logits = llama.apply(graphdef, params, tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

  expected = jax.jit(jax.value_and_grad(loss))(params, tokens)
  mesh = sharding_lib.make_mesh("data=2,fsdp=2,tensor=2")
  specs = llama.partition_specs(params, "fsdp_tp", mesh=mesh)
  sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
  with jax.set_mesh(mesh):
    got = jax.jit(jax.value_and_grad(loss))(
        sharded, jax.device_put(tokens, NamedSharding(mesh, llama.batch_spec("fsdp_tp"))))
    # The batch's split over data and fsdp; a batch that does not split is left to XLA.
    assert llama._batch_layout(8) == (("data", "fsdp"), "data", 2)  # pylint: disable=protected-access
    assert llama._batch_layout(3) is None  # pylint: disable=protected-access
  assert llama._batch_layout(8) is None  # pylint: disable=protected-access  (no mesh)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, expected)


def test_collective_bytes_of_known_collectives():
  # Per-device blocks of a 1-D mesh of 8: every expected size below is that block's or the
  # gathered array's, in bytes (4 per element; the CPU backend widens 16-bit collectives).
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))

  def collectives(a, b, c, d, e):
    return (jax.lax.all_gather(a, "x", tiled=True),  # [2, 4] -> [16, 4] f32: 256
            jax.lax.psum(b, "x"),  # [3, 4] f32: 48
            jax.lax.psum_scatter(c, "x", scatter_dimension=0, tiled=True),  # [8, 4] f32 in: 128
            jax.lax.all_to_all(d, "x", 0, 0, tiled=True),  # [16, 4] f32: 256
            jax.lax.ppermute(e, "x", [(i, (i + 1) % 8) for i in range(8)]))  # [5, 4] int32: 80

  fn = jax.jit(jax.shard_map(collectives, mesh=mesh, in_specs=P("x"),
                             out_specs=(P(), P(), P("x"), P("x"), P("x")), check_vma=False))
  args = [jax.ShapeDtypeStruct((8 * rows, 4), dtype) for rows, dtype in
          [(2, jnp.float32), (3, jnp.float32), (8, jnp.float32), (16, jnp.float32),
           (5, jnp.int32)]]
  assert sharding_lib.collective_bytes(fn.lower(*args).compile()) == {
      "all-gather": 256, "all-reduce": 48, "reduce-scatter": 128, "all-to-all": 256,
      "collective-permute": 80}
  local = jax.jit(lambda a: a * 2).lower(jnp.zeros((4, 4))).compile()
  assert set(sharding_lib.collective_bytes(local).values()) == {0}


def test_collective_bytes_reads_async_pairs_and_typed_operands():
  # The forms other backends print: start/done pairs count once, from the done's result.
  hlo = """
  %p = f32[2,4]{1,0} parameter(0)
  %q = bf16[8,4]{1,0} parameter(1)
  %ags = (f32[2,4]{1,0}, f32[16,4]{1,0}) all-gather-start(%p), dimensions={0}
  %agd = f32[16,4]{1,0} all-gather-done(%ags)
  %ars = f32[2,4]{1,0} all-reduce-start(%p), to_apply=%add
  %ard = f32[2,4]{1,0} all-reduce-done(%ars)
  %cps = (f32[2,4]{1,0}, f32[2,4]{1,0}, u32[], u32[]) collective-permute-start(%p)
  %cpd = f32[2,4]{1,0} collective-permute-done(%cps)
  %a2a = (f32[2,4]{1,0}, f32[2,4]{1,0}) all-to-all(%p, /*index=1*/%p), dimensions={0}
  ROOT %rs = bf16[1,4]{1,0} reduce-scatter(bf16[8,4]{1,0} %q), dimensions={0}, to_apply=%add
  """
  assert sharding_lib.collective_bytes(hlo) == {
      "all-gather": 256, "all-reduce": 32, "reduce-scatter": 64, "all-to-all": 64,
      "collective-permute": 32}
