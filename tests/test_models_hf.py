"""Hugging Face checkpoint import/export, checked against transformers' LlamaForCausalLM.

torch and transformers are test-only references; nothing is downloaded: the
reference models are built from random weights in the test.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from models import hf
from models import llama
from models import load_hf_llama
from models import save_hf_llama

torch = pytest.importorskip("torch", reason="torch is the reference for the HF tests (dev extra)")
transformers = pytest.importorskip(
    "transformers", reason="transformers' LlamaForCausalLM is the reference (dev extra)")

VOCAB = 128
_forward = jax.jit(llama.apply, static_argnums=0)


def _hf_model(seed=0, **overrides):
  kwargs = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=0.1)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def _tokens(batch=2, seq=16, seed=0):
  return np.random.default_rng(seed).integers(0, VOCAB, (batch, seq))


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(tokens)).logits.float().numpy()


def _logits(model, tokens):
  graphdef, params = llama.split_params(model)
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens, jnp.int32)))


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory):
  """A random GQA LLaMA (4 query heads, 2 kv heads, rope_theta 5000) saved by transformers."""
  model = _hf_model()
  path = tmp_path_factory.mktemp("hf_gqa")
  model.save_pretrained(path)
  return path, model


def test_config_from_hf_json(gqa_checkpoint):
  path, _ = gqa_checkpoint
  with open(path / "config.json") as f:
    cfg = hf.config_from_hf(json.load(f))
  assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers) == (
      VOCAB, 64, 96, 2)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4, 2, 16)
  assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (5000.0, 1e-5, 64)
  assert cfg.tie_word_embeddings is False
  assert cfg.dtype == cfg.param_dtype == "float32"


def test_load_matches_transformers_logits(gqa_checkpoint):
  path, reference = gqa_checkpoint
  model = load_hf_llama(path)
  assert model.config.num_kv_heads == 2
  tokens = _tokens()
  want = _hf_logits(reference, tokens)
  assert np.abs(want).max() > 1.0  # large enough for the comparison to mean something
  np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-5, atol=2e-5)
  # Eager call on the returned model works too ("ready to call").
  np.testing.assert_allclose(model(jnp.asarray(tokens[:1, :4])), want[:1, :4], rtol=1e-5,
                             atol=2e-5)


def test_load_sharded_checkpoint_with_index(gqa_checkpoint, tmp_path):
  _, reference = gqa_checkpoint
  reference.save_pretrained(tmp_path, max_shard_size="40KB")
  assert (tmp_path / hf.INDEX_FILE).exists()
  assert len(list(tmp_path.glob("*.safetensors"))) > 1
  tokens = _tokens(seed=1)
  np.testing.assert_allclose(_logits(load_hf_llama(tmp_path), tokens),
                             _hf_logits(reference, tokens), rtol=1e-5, atol=2e-5)


def test_save_round_trips_through_transformers(gqa_checkpoint, tmp_path):
  path, reference = gqa_checkpoint
  model = load_hf_llama(path)
  save_hf_llama(model, tmp_path)
  assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
  reopened = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  assert reopened.config.num_key_value_heads == 2
  assert reopened.config.rope_parameters["rope_theta"] == 5000.0
  tokens = _tokens(seed=2)
  np.testing.assert_array_equal(_hf_logits(reopened, tokens), _hf_logits(reference, tokens))
  # And back again: an identical Flax model.
  again = llama.split_params(load_hf_llama(tmp_path))[1]
  jax.tree.map(np.testing.assert_array_equal, again, llama.split_params(model)[1])


def test_model_trained_here_opens_in_transformers(tmp_path):
  cfg = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_layers=2,
                          num_heads=4, num_kv_heads=1, rope_theta=123.0,
                          max_position_embeddings=32)
  graphdef, params = llama.init_params(cfg, seed=3)
  params = jax.tree.map(lambda p: p * 3.0, params)  # away from the small initial scale
  model = nnx.merge(graphdef, params)
  save_hf_llama(model, tmp_path)
  reopened = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
  tokens = _tokens(seq=12, seed=4)
  np.testing.assert_allclose(_hf_logits(reopened, tokens), _logits(model, tokens),
                             rtol=1e-5, atol=2e-5)


def test_tied_embeddings(tmp_path):
  reference = _hf_model(seed=5, tie_word_embeddings=True, num_key_value_heads=4)
  reference.save_pretrained(tmp_path / "in")
  model = load_hf_llama(tmp_path / "in")
  assert model.config.tie_word_embeddings and model.lm_head is None
  tokens = _tokens(seed=5)
  want = _hf_logits(reference, tokens)
  np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-5, atol=2e-5)
  save_hf_llama(model, tmp_path / "out")
  reopened = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
  assert reopened.config.tie_word_embeddings
  np.testing.assert_allclose(_hf_logits(reopened, tokens), want, rtol=1e-6, atol=1e-6)


def test_bfloat16_checkpoint_and_overrides(gqa_checkpoint, tmp_path):
  _, reference = gqa_checkpoint
  copy.deepcopy(reference).to(torch.bfloat16).save_pretrained(tmp_path)
  model = load_hf_llama(tmp_path, dtype="bfloat16", param_dtype="bfloat16", remat=True)
  assert (model.config.dtype, model.config.param_dtype, model.config.remat) == (
      "bfloat16", "bfloat16", True)
  params = llama.split_params(model)[1]
  assert {p.dtype for p in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  tokens = _tokens(seed=6)
  got = _logits(model, tokens)
  assert got.dtype == np.float32
  want = _hf_logits(reference, tokens)
  assert np.abs(got - want).max() < 0.1 * np.abs(want).max()  # bf16 end to end
  save_hf_llama(model, tmp_path / "f32", dtype="float32")
  assert json.loads((tmp_path / "f32" / "config.json").read_text())["torch_dtype"] == "float32"


@pytest.mark.parametrize("overrides, match", [
    (dict(rope_scaling={"rope_type": "linear", "factor": 2.0}), "rope type 'linear'"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0,
                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}), "rope type 'llama3'"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(head_dim=32), "head_dim"),
])
def test_unsupported_configs_raise(overrides, match):
  config = hf.config_to_hf(llama.CONFIGS["tiny"])
  config.pop("rope_parameters")  # the legacy layout, as transformers 4 writes it
  config.update(overrides)
  with pytest.raises(NotImplementedError, match=match):
    hf.config_from_hf(config)
  with pytest.raises(ValueError, match="model_type"):
    hf.config_from_hf({**config, "model_type": "mistral"})


def test_config_round_trip_and_mismatched_tensors(tmp_path):
  cfg = llama.CONFIGS["60m"]
  assert hf.config_from_hf(hf.config_to_hf(cfg)) == cfg
  with pytest.raises(ValueError, match="missing"):
    hf.params_from_hf(lambda name: None, frozenset({"model.norm.weight"}), cfg)
  with pytest.raises(FileNotFoundError):
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
    load_hf_llama(tmp_path)
