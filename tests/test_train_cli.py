"""The pretraining command line: --help, parsing, and one clear message per bad argument."""

import pathlib
import tempfile

import pytest

from train import config as config_lib
from train import pretrain

# Flags named by issue 4; their spelling is part of the contract.
CONTRACT_FLAGS = (
    "--model", "--optimizer", "--dataset", "--tokenizer", "--steps", "--batch-size", "--seq-len",
    "--lr", "--warmup-steps", "--final-lr-ratio", "--rank", "--update-proj-gap", "--scale",
    "--history-size", "--damping", "--weight-decay", "--grad-clip", "--eval-every",
    "--eval-batches", "--checkpoint-every", "--workdir", "--seed", "--mesh",
)


def test_help_documents_every_flag(capsys):
  with pytest.raises(SystemExit) as exit_info:
    pretrain.main(["--help"])
  assert exit_info.value.code == 0
  text = capsys.readouterr().out
  for flag in CONTRACT_FLAGS:
    assert flag in text, flag
  for choice in ("tiny", "7b", "adamw", "galore", "natural_galore", "optax_galore"):
    assert choice in text


def test_from_argv_fills_the_config():
  cfg = config_lib.from_argv(["--model", "60m", "--optimizer", "galore", "--rank", "64",
                              "--mesh", "data=2,fsdp=4", "--override", "num_layers=2",
                              "--no-progress"])
  assert (cfg.model, cfg.optimizer.name, cfg.optimizer.rank, cfg.progress) == (
      "60m", "galore", 64, False)
  assert cfg.model_overrides == (("num_layers", 2),)
  assert cfg.resolved_workdir() == "runs/galore-60m"
  assert config_lib.parse_mesh(cfg.mesh) == {"data": 2, "fsdp": 4}
  assert config_lib.from_argv([]) == config_lib.TrainConfig()


def test_natural_galore_flags_reach_the_optimizer():
  import jax
  import jax.numpy as jnp
  import ngalore_jax as ng
  from train import optimizers
  cfg = config_lib.from_argv(["--history-size", "3", "--history-dtype", "bfloat16",
                              "--proj-type", "reverse_std", "--refresh-policy", "rotate",
                              "--exponent", "-0.5", "--damping-mode", "relative"])
  tx = optimizers.build_optimizer(cfg, lambda step: 1e-3)
  params = {"blocks": {0: {"attn": {"q": {"kernel": jnp.zeros((16, 4))}}}}}
  state = jax.eval_shape(tx.init, params)
  is_woodbury = lambda x: isinstance(x, ng.WoodburyState)
  (woodbury,) = [x for x in jax.tree.leaves(state, is_leaf=is_woodbury) if is_woodbury(x)]
  history = woodbury.history  # inside the projection the inner state is per leaf
  # reverse_std on a 16 x 4 kernel: projector on the larger side, coefficients r x 4 = 4 x 4.
  assert history.shape == (3, 4, 4) and history.dtype == jnp.bfloat16


@pytest.mark.parametrize("argv, message", [
    (["--model", "13b"], "argument --model: invalid choice"),
    (["--optimizer", "sgd"], "argument --optimizer: invalid choice"),
    (["--steps", "0"], "argument --steps: must be a positive integer"),
    (["--mesh", "pipeline=2"], "expected axis=size pairs"),
    (["--lr", "inf"], "argument --lr: must be a finite number > 0, got inf"),
    (["--lr", "nan"], "argument --lr: must be a finite number > 0, got nan"),
    (["--lr", "0"], "argument --lr: must be a finite number > 0, got 0"),
])
def test_argument_errors_exit_with_usage(argv, message, capsys):
  with pytest.raises(SystemExit) as exit_info:
    pretrain.main(argv)
  assert exit_info.value.code == 2
  err = capsys.readouterr().err
  assert message in err and "Traceback" not in err


@pytest.mark.parametrize("argv, message", [
    (["--rank", "300"], "--rank 300 exceeds the model width (hidden_size 256"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the maximum positions of --model tiny (512)"),
    (["--dataset", "text:/nonexistent/dir/*.txt"], "--dataset: text:/nonexistent/dir/*.txt: no"),
    (["--mesh", "data=3"], "--batch-size 16 must be a multiple of 3"),
    (["--mesh", "data=64"], "needs 64 devices"),
    (["--override", "depth=3"], "--override depth: not a field of the model config"),
    (["--override", "hidden_size=-1"], "--override: hidden_size must be positive"),
    (["--override", "num_layers=2.5"], "--override num_layers=2.5: num_layers takes an integer"),
    (["--override", "num_layers=abc"], "--override num_layers=abc: num_layers takes an integer"),
    (["--override", "hidden_size=null"],
     "--override hidden_size=null: hidden_size takes an integer"),
    (["--override", "remat=maybe"], "--override remat=maybe: remat takes true or false"),
    (["--override", "rope_theta=Infinity"],
     "--override rope_theta=Infinity: rope_theta takes a finite number"),
    (["--override", "num_kv_heads=2.0"],
     "--override num_kv_heads=2.0: num_kv_heads takes an integer or null"),
    (["--warmup-steps", "500", "--steps", "100"], "--warmup-steps 500 must be below --steps"),
    (["--exponent", "0.5"], "--optimizer natural_galore: --exponent must be in [-1.0, 0.0), got 0.5"),
    (["--history-size", "0"], "--history-size must be an integer >= 1, got 0"),
    (["--optimizer", "adamw", "--b1", "1.5"], "--b1 must lie in [0, 1), got 1.5"),
])
def test_bad_values_print_one_error_line(argv, message, capsys, tmp_path):
  # The trainer finds a bad library option (--history-size, --exponent) only after loading the
  # data: a small local corpus spares those cases fetching and tokenizing the default dataset.
  if "--dataset" not in argv:
    (tmp_path / "docs.txt").write_text("a small corpus, not the default one to fetch.\n" * 200)
    argv = argv + ["--dataset", f"text:{tmp_path / 'docs.txt'}"]
  code = pretrain.main(argv + ["--batch-size", "16", "--workdir", str(tmp_path / "run")])
  captured = capsys.readouterr()
  assert code == 2
  assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
  assert message in captured.err
  assert "Traceback" not in captured.err + captured.out
  assert not (tmp_path / "run").exists()


def test_model_overrides_are_typed_by_the_model_config():
  cfg = config_lib.from_argv(["--override", "remat=True", "--override", "rope_theta=500000",
                              "--override", "num_kv_heads=null", "--override", "num_layers=2"])
  model = config_lib.model_config(cfg)
  assert model.remat is True and model.num_layers == 2 and model.num_kv_heads == model.num_heads
  assert model.rope_theta == 500000.0 and isinstance(model.rope_theta, float)


def _unwritable_dir(tmp_path):
  """A directory this process cannot create anything in (root ignores modes: use sysfs)."""
  candidates = [tmp_path / "read-only", pathlib.Path("/sys")]
  candidates[0].mkdir()
  candidates[0].chmod(0o555)
  for candidate in candidates:
    try:
      tempfile.mkdtemp(dir=candidate)
    except OSError:
      return candidate
  pytest.skip("no unwritable directory here")


@pytest.mark.parametrize("where", ["a file", "under a file", "unwritable"])
def test_a_workdir_that_cannot_be_used_is_one_error_before_any_data_loads(where, tmp_path, capsys):
  (tmp_path / "file").write_text("not a directory")
  workdir, message = {
      "a file": (tmp_path / "file", f"--workdir {tmp_path}/file is a file; give a directory"),
      "under a file": (tmp_path / "file" / "run",
                       f"--workdir {tmp_path}/file/run is under the file {tmp_path}/file;"),
      "unwritable": (None, "cannot write in"),
  }[where]
  if workdir is None:
    parent = _unwritable_dir(tmp_path)
    workdir, message = parent / "run", f"--workdir {parent}/run: cannot write in {parent} ("
  # A dataset that does not exist: the workdir is checked before any data is looked at.
  code = pretrain.main(["--workdir", str(workdir), "--dataset", "text:/nonexistent/*.txt"])
  captured = capsys.readouterr()
  assert code == 2
  assert captured.err.startswith(f"error: {message}") and captured.err.count("\n") == 1, (
      captured.err)
  assert "Traceback" not in captured.err + captured.out
