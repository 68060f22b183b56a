"""The trainer's optimizer registry: flags generated from configs, builds equal to the library's,
and the resume check that derives shape-changing options from the optimizer state itself."""

import dataclasses
import inspect
import json
import logging
import random
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import ngalore_jax as ng
from train import config as config_lib
from train import optimizers
from train import pretrain
from train import resume

PARAMS = {
    "blocks": {0: {"attn": {"q": {"kernel": jnp.ones((16, 8))}},
                   "mlp": {"up": {"kernel": jnp.ones((8, 24))}},
                   "mlp_norm": {"scale": jnp.ones((8,))}}},
    "embed": {"embedding": jnp.ones((32, 8))},
}


def _grads(seed):
  keys = jax.random.split(jax.random.key(seed), len(jax.tree.leaves(PARAMS)))
  leaves, treedef = jax.tree.flatten(PARAMS)
  return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _run(tx, steps=4):
  params, state = PARAMS, tx.init(PARAMS)
  for i in range(steps):
    updates, state = tx.update(_grads(i), state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def _projected(params):
  # Which kernels the trainer projects: models.llama.galore_mask's rule (attention/MLP kernels).
  from models import llama  # pylint: disable=import-outside-toplevel
  return llama.galore_mask(params)


@pytest.mark.parametrize("name, options, reference", [
    ("galore", dict(rank=2, update_proj_gap=2, proj_type="reverse_std"),
     lambda lr, mask, decay: ng.galore(lr, rank=2, update_proj_gap=2, scale=0.25,
                                       proj_type="reverse_std", mask=mask,
                                       weight_decay_mask=decay)),
    ("natural_galore", dict(rank=2, update_proj_gap=2, history_size=3,
                            history_dtype="bfloat16", damping=1e-2),
     lambda lr, mask, decay: ng.natural_galore(lr, rank=2, update_proj_gap=2, scale=0.25,
                                               history_size=3, history_dtype=jnp.bfloat16,
                                               damping=1e-2, mask=mask,
                                               weight_decay_mask=decay)),
    ("adamw", dict(weight_decay=0.1),
     lambda lr, mask, decay: optax.adamw(lr, weight_decay=0.1, mask=decay)),
    ("natural_galore", dict(rank=2, update_proj_gap=2, preconditioner="kronecker",
                            kronecker_beta=0.9),
     lambda lr, mask, decay: ng.natural_galore(lr, rank=2, update_proj_gap=2, scale=0.25,
                                               preconditioner="kronecker", kronecker_beta=0.9,
                                               mask=mask, weight_decay_mask=decay)),
    ("natural_galore_official", dict(rank=2, update_proj_gap=2),
     lambda lr, mask, decay: ng.natural_galore(lr, rank=2, update_proj_gap=2, scale=0.25,
                                               proj_type="full", history_size=20, damping=1e-3,
                                               exponent=-1.0, eps=1e-6, refresh_policy="keep",
                                               history_dtype=None, mask=mask,
                                               weight_decay_mask=decay)),
    ("fira", dict(rank=2, update_proj_gap=2),
     lambda lr, mask, decay: ng.fira(lr, rank=2, update_proj_gap=2, scale=0.25, eps=1e-6,
                                     mask=mask, weight_decay_mask=decay)),
    ("apollo", dict(rank=2, update_proj_gap=2, projection="svd", scale_type="tensor"),
     lambda lr, mask, decay: ng.apollo(lr, rank=2, update_proj_gap=2, projection="svd",
                                       scale_type="tensor", mask=mask,
                                       weight_decay_mask=decay)),
    ("apollo_mini", dict(update_proj_gap=2),
     lambda lr, mask, decay: ng.apollo_mini(lr, update_proj_gap=2, mask=mask,
                                            weight_decay_mask=decay)),
])
def test_build_equals_the_library_call(name, options, reference):
  built = optimizers.make(name, **options).build(1e-2)
  expected = reference(1e-2, _projected, optimizers.decay_mask)
  got_params, got_state = _run(built)
  want_params, want_state = _run(expected)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               got_params, want_params)
  assert ng.optimizer_state_bytes(got_state) == ng.optimizer_state_bytes(want_state)


def test_unset_options_take_the_library_defaults():
  state = jax.eval_shape(optimizers.make("natural_galore", rank=2).build(1e-3).init, PARAMS)
  default = inspect.signature(ng.natural_galore).parameters["history_size"].default
  is_woodbury = lambda x: isinstance(x, ng.WoodburyState)
  histories = [x.history for x in jax.tree.leaves(state, is_leaf=is_woodbury) if is_woodbury(x)]
  assert histories and all(h.shape[0] == default for h in histories)


def test_unknown_options_and_optimizers_are_errors():
  with pytest.raises(ValueError, match="galore takes no option history_size"):
    optimizers.make("galore", history_size=3)
  with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
    optimizers.make("sgd")


def test_a_registered_config_gets_its_flags_without_touching_the_cli(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class SignSGDConfig(optimizers.OptimizerConfig):
    name: ClassVar[str] = "signsgd_test"
    description: ClassVar[str] = "sign of the gradient"
    momentum: float = optimizers.option(0.0, "momentum of the sign", type=float)

    def build(self, learning_rate, *, projected=None, decayed=None):
      return optax.chain(optax.scale_by_sign(), optax.trace(self.momentum),
                         optax.scale_by_learning_rate(learning_rate))

  monkeypatch.setitem(optimizers.REGISTRY, SignSGDConfig.name, SignSGDConfig)
  cfg = config_lib.from_argv(["--optimizer", "signsgd_test", "--momentum", "0.5"])
  assert cfg.optimizer == SignSGDConfig(momentum=0.5)
  assert "--momentum" in config_lib.build_parser().format_help()
  assert config_lib.TrainConfig.from_dict(cfg.to_dict()).optimizer == cfg.optimizer


def test_conflicting_option_declarations_are_refused(monkeypatch):
  @dataclasses.dataclass(frozen=True)
  class Clash(optimizers.OptimizerConfig):
    name: ClassVar[str] = "clash_test"
    rank: str = optimizers.option("a", "a rank of another type", type=str)

  monkeypatch.setitem(optimizers.REGISTRY, Clash.name, Clash)
  with pytest.raises(TypeError, match="option 'rank' of clash_test differs"):
    optimizers.option_fields()


def test_options_another_optimizer_ignores_are_reported(caplog):
  with caplog.at_level(logging.WARNING):
    cfg = config_lib.from_argv(["--optimizer", "adamw", "--rank", "8", "--history-size", "3"])
  assert cfg.optimizer == optimizers.AdamWConfig()
  assert "--optimizer adamw ignores --history-size, --rank" in caplog.text


def test_choices_come_from_the_library():
  help_text = config_lib.build_parser().format_help()
  for choices in (ng.PROJ_TYPES, ng.REFRESH_POLICIES, ng.SVD_METHODS, ng.DAMPING_MODES):
    assert "{" + ",".join(choices) + "}" in help_text


def test_non_finite_option_values_are_refused(capsys):
  with pytest.raises(SystemExit):
    config_lib.from_argv(["--damping", "inf"])
  assert "--damping: must be a finite number" in capsys.readouterr().err


# -- resume ----------------------------------------------------------------------------------------

ABSTRACT = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), PARAMS)


def _config(**options):
  return config_lib.TrainConfig(optimizer=optimizers.make("natural_galore", **options))


@pytest.mark.parametrize("changed, expected", [
    (dict(rank=4), ["rank"]),
    (dict(history_size=5), ["history_size"]),
    (dict(history_dtype="bfloat16"), ["history_dtype"]),
    (dict(proj_type="reverse_std"), ["proj_type"]),
    (dict(rank=4, damping=1e-1, update_proj_gap=7), ["rank"]),
    (dict(damping=1e-1, exponent=-0.5, update_proj_gap=7, refresh_policy="keep"), []),
])
def test_shape_changing_options_are_derived_from_the_state(changed, expected):
  saved = _config(rank=2, history_size=3, proj_type="std")
  current = dataclasses.replace(saved, optimizer=dataclasses.replace(saved.optimizer, **changed))
  assert resume.shape_changing_options(saved, current, ABSTRACT) == expected


def test_old_flat_configs_still_read():
  flat = {"optimizer": "galore", "rank": 16, "update_proj_gap": 50, "history_size": None,
          "lr": 0.01, "model": "tiny"}
  cfg = config_lib.TrainConfig.from_dict(flat)
  assert cfg.optimizer == optimizers.make("galore", rank=16, update_proj_gap=50)
  assert cfg.lr == 0.01


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  rng = random.Random(1)
  words = ["alpha", "beta", "gamma", "delta", "river", "stone", "light", "north"]
  with open(root / "docs.jsonl", "w", encoding="utf-8") as f:
    for i in range(200):
      text = " ".join(rng.choice(words) for _ in range(rng.randint(20, 60)))
      f.write(json.dumps({"text": f"Doc {i}. {text}."}) + "\n")
  return root


def _args(workdir, corpus, *extra):
  return ["--override", "num_layers=1", "--override", "hidden_size=32",
          "--override", "intermediate_size=64", "--override", "max_position_embeddings=32",
          "--dataset", f"text:{corpus}/*.jsonl", "--steps", "4", "--warmup-steps", "1",
          "--batch-size", "4", "--seq-len", "16", "--eval-batches", "1", "--no-progress",
          "--mesh", "data=1", "--optimizer", "natural_galore", "--update-proj-gap", "2",
          "--workdir", str(workdir), *extra]


@pytest.mark.slow
def test_resume_with_shape_changing_flags_is_refused_at_start(tmp_path, corpus, capsys, caplog):
  workdir = tmp_path / "run"
  assert pretrain.main(_args(workdir, corpus, "--rank", "8", "--history-size", "3",
                             "--stop-at", "2")) == 0
  before = (workdir / "metrics.jsonl").read_text()
  capsys.readouterr()
  code = pretrain.main(_args(workdir, corpus, "--rank", "4", "--history-size", "2",
                             "--damping", "0.01"))
  err = capsys.readouterr().err
  assert code == 2, err
  assert err.count("\n") == 1 and "Traceback" not in err
  assert "--rank 8 (now 4), --history-size 3 (now 2)" in err and "--damping" not in err
  assert (workdir / "metrics.jsonl").read_text() == before
  # A change that keeps the state's shapes resumes, with a warning naming it.
  with caplog.at_level(logging.WARNING):
    assert pretrain.main(_args(workdir, corpus, "--rank", "8", "--history-size", "3",
                               "--damping", "0.01")) == 0
  assert "resuming with changed --damping" in caplog.text
