"""Hugging Face LLaMA checkpoints: ``config.json`` + safetensors, in both directions.

Reading and writing use the ``safetensors`` numpy API only; torch is never
imported. Hugging Face stores ``nn.Linear`` weights as ``(out, in)``; the kernels
here are ``(in, out)``, so every matrix is transposed on the way in and out.

==========================================================  ===============================
Hugging Face name                                           params path
==========================================================  ===============================
model.embed_tokens.weight                                   embed/embedding
model.layers.{i}.input_layernorm.weight                     blocks/{i}/attn_norm/scale
model.layers.{i}.self_attn.{q,k,v,o}_proj.weight (T)        blocks/{i}/attn/{q,k,v,o}/kernel
model.layers.{i}.post_attention_layernorm.weight            blocks/{i}/mlp_norm/scale
model.layers.{i}.mlp.{gate,up,down}_proj.weight (T)         blocks/{i}/mlp/{gate,up,down}/kernel
model.norm.weight                                           final_norm/scale
lm_head.weight (T; absent when tied)                        lm_head/kernel
==========================================================  ===============================
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from models import llama

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Buffers some older checkpoints carry; they are recomputed here, never loaded.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _rope_settings(hf: Mapping[str, Any]) -> tuple[str, float]:
  """(rope type, theta) from either the transformers 5 or the transformers 4 layout."""
  params = hf.get("rope_parameters") or {}
  scaling = hf.get("rope_scaling") or {}
  rope_type = (params.get("rope_type") or params.get("type") or scaling.get("rope_type")
               or scaling.get("type") or "default")
  theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
  return rope_type, float(theta)


def config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> llama.LlamaConfig:
  """Builds a :class:`~models.llama.LlamaConfig` from a Hugging Face LLaMA config dict.

  Args:
    hf: the parsed ``config.json``.
    **overrides: fields to set on the result (e.g. ``dtype="bfloat16"``, ``remat=True``).

  Returns:
    The config; ``dtype`` and ``param_dtype`` default to float32 whatever the
    checkpoint's storage dtype.

  Raises:
    NotImplementedError: for a feature this model does not implement (rope
      scaling, biases, an activation other than SiLU, a non-default head_dim),
      rather than silently computing something else.
    ValueError: if the config is not a LLaMA config.
  """
  model_type = hf.get("model_type", "llama")
  if model_type != "llama":
    raise ValueError(f"model_type {model_type!r} is not supported; expected 'llama'")
  rope_type, rope_theta = _rope_settings(hf)
  if rope_type != "default":
    raise NotImplementedError(f"rope type {rope_type!r} is not implemented; only plain RoPE "
                              "('default', no rope_scaling) is supported")
  act = hf.get("hidden_act", "silu")
  if act not in ("silu", "swish"):
    raise NotImplementedError(f"hidden_act {act!r} is not implemented; only 'silu'")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag, False):
      raise NotImplementedError(f"{flag}=True is not implemented; this model has no biases")
  hidden, heads = hf["hidden_size"], hf["num_attention_heads"]
  head_dim = hf.get("head_dim")
  if head_dim is not None and head_dim != hidden // heads:
    raise NotImplementedError(f"head_dim={head_dim} differs from hidden_size / "
                              f"num_attention_heads = {hidden // heads}; not implemented")
  config = llama.LlamaConfig(
      vocab_size=hf["vocab_size"],
      hidden_size=hidden,
      intermediate_size=hf["intermediate_size"],
      num_layers=hf["num_hidden_layers"],
      num_heads=heads,
      num_kv_heads=hf.get("num_key_value_heads") or heads,
      max_position_embeddings=hf.get("max_position_embeddings", 2048),
      rope_theta=rope_theta,
      rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
      tie_word_embeddings=hf.get("tie_word_embeddings", False),
  )
  return dataclasses.replace(config, **overrides)


def config_to_hf(config: llama.LlamaConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict of a config (``LlamaForCausalLM``).

  The RoPE base is written both as ``rope_theta`` (transformers 4) and inside
  ``rope_parameters`` (transformers 5).
  """
  return {
      "architectures": ["LlamaForCausalLM"],
      "model_type": "llama",
      "vocab_size": config.vocab_size,
      "hidden_size": config.hidden_size,
      "intermediate_size": config.intermediate_size,
      "num_hidden_layers": config.num_layers,
      "num_attention_heads": config.num_heads,
      "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim,
      "hidden_act": "silu",
      "max_position_embeddings": config.max_position_embeddings,
      "rms_norm_eps": config.rms_norm_eps,
      "rope_theta": config.rope_theta,
      "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
      "tie_word_embeddings": config.tie_word_embeddings,
      "attention_bias": False,
      "attention_dropout": 0.0,
      "mlp_bias": False,
      "pretraining_tp": 1,
      "initializer_range": 0.02,
      "use_cache": True,
      "torch_dtype": config.param_dtype,
  }


def _name_map(config: llama.LlamaConfig) -> dict[str, tuple[tuple[Any, ...], bool]]:
  """``{hf_name: (params path, transposed)}`` for every parameter of ``config``."""
  names = {
      "model.embed_tokens.weight": (("embed", "embedding"), False),
      "model.norm.weight": (("final_norm", "scale"), False),
  }
  if not config.tie_word_embeddings:
    names["lm_head.weight"] = (("lm_head", "kernel"), True)
  for i in range(config.num_layers):
    prefix = f"model.layers.{i}."
    names[prefix + "input_layernorm.weight"] = (("blocks", i, "attn_norm", "scale"), False)
    names[prefix + "post_attention_layernorm.weight"] = (("blocks", i, "mlp_norm", "scale"),
                                                          False)
    for proj in ("q", "k", "v", "o"):
      names[prefix + f"self_attn.{proj}_proj.weight"] = (("blocks", i, "attn", proj, "kernel"),
                                                         True)
    for proj in ("gate", "up", "down"):
      names[prefix + f"mlp.{proj}_proj.weight"] = (("blocks", i, "mlp", proj, "kernel"), True)
  return names


def _get(tree: Mapping[Any, Any], path: tuple[Any, ...]) -> Any:
  for key in path:
    tree = tree[key]
  return tree


def _set(tree: dict[Any, Any], path: tuple[Any, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def params_from_hf(
    get_tensor: Callable[[str], np.ndarray],
    names: set[str] | frozenset[str],
    config: llama.LlamaConfig,
) -> dict[str, Any]:
  """Converts Hugging Face tensors into the nested params dict of :func:`llama.split_params`.

  Args:
    get_tensor: returns the numpy array stored under a Hugging Face name.
    names: every tensor name in the checkpoint.
    config: the model config; shapes are checked against it.

  Returns:
    Nested dict of ``jax.Array`` in ``config.param_dtype``.

  Raises:
    ValueError: for missing, unexpected or mis-shaped tensors.
  """
  _, abstract = llama.abstract_params(config)
  expected = _name_map(config)
  ignored = {n for n in names if n.endswith(_IGNORED_SUFFIXES)}
  if config.tie_word_embeddings:
    ignored |= {"lm_head.weight"} & set(names)  # a tied copy some writers store anyway
  missing = sorted(set(expected) - set(names))
  unexpected = sorted(set(names) - set(expected) - ignored)
  if missing or unexpected:
    raise ValueError(f"checkpoint does not match the config: missing {missing[:8]}"
                     f"{'...' if len(missing) > 8 else ''}, unexpected {unexpected[:8]}"
                     f"{'...' if len(unexpected) > 8 else ''}")
  params: dict[str, Any] = {}
  for name, (path, transposed) in expected.items():
    array = get_tensor(name)
    if transposed:
      array = array.T
    want = _get(abstract, path)
    if tuple(array.shape) != tuple(want.shape):
      raise ValueError(f"{name}: shape {tuple(array.shape)} (after transpose: {transposed}) "
                       f"does not match {tuple(want.shape)}")
    _set(params, path, jnp.asarray(array, dtype=want.dtype))
  return params


def params_to_hf(params: Mapping[str, Any], config: llama.LlamaConfig,
                 dtype: Any = None) -> dict[str, np.ndarray]:
  """The Hugging Face tensors of a nested params dict, as contiguous numpy arrays.

  Args:
    params: nested dict of arrays (:func:`llama.split_params`).
    config: the model config.
    dtype: storage dtype; defaults to each parameter's own dtype.
  """
  tensors = {}
  for name, (path, transposed) in _name_map(config).items():
    array = np.asarray(jax.device_get(_get(params, path)))
    if dtype is not None:
      array = array.astype(jnp.dtype(dtype))
    tensors[name] = np.ascontiguousarray(array.T if transposed else array)
  return tensors


def _weight_files(path: str) -> dict[str, str]:
  """``{tensor name: file}`` for a single-file or an index-sharded checkpoint."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      weight_map = json.load(f)["weight_map"]
    return {name: os.path.join(path, file) for name, file in weight_map.items()}
  single = os.path.join(path, WEIGHTS_FILE)
  if not os.path.exists(single):
    raise FileNotFoundError(f"neither {WEIGHTS_FILE} nor {INDEX_FILE} in {path}")
  with safe_open(single, framework="numpy") as f:
    return {name: single for name in f.keys()}


def load_hf_llama(path: str | os.PathLike[str], **overrides: Any) -> llama.Llama:
  """Loads a Hugging Face LLaMA checkpoint directory into a :class:`~models.llama.Llama`.

  Reads ``config.json`` and either ``model.safetensors`` or the shards listed
  in ``model.safetensors.index.json``. bfloat16 checkpoints load through
  ``ml_dtypes``; values are cast to the config's ``param_dtype``.

  Args:
    path: the checkpoint directory (as written by ``save_pretrained``).
    **overrides: :class:`~models.llama.LlamaConfig` fields to set, e.g.
      ``dtype="bfloat16"``, ``param_dtype="bfloat16"``, ``remat=True``.

  Returns:
    The model, ready to call; its config is ``model.config``.

  Raises:
    NotImplementedError: for configs this model cannot reproduce (see
      :func:`config_from_hf`).
    ValueError: if the tensors do not match the config.
  """
  path = os.fspath(path)
  with open(os.path.join(path, CONFIG_FILE)) as f:
    config = config_from_hf(json.load(f), **overrides)
  files = _weight_files(path)
  with contextlib.ExitStack() as stack:
    handles = {file: stack.enter_context(safe_open(file, framework="numpy"))
               for file in set(files.values())}
    params = params_from_hf(lambda name: handles[files[name]].get_tensor(name),
                            frozenset(files), config)
  graphdef, _ = llama.abstract_params(config)
  return nnx.merge(graphdef, params)


def save_hf_llama(model: llama.Llama, path: str | os.PathLike[str], *, dtype: Any = None) -> None:
  """Writes a model as a Hugging Face checkpoint that ``LlamaForCausalLM`` opens.

  Creates ``path`` if needed and writes ``config.json`` and a single
  ``model.safetensors`` (overwriting both).

  Args:
    model: the :class:`~models.llama.Llama` to save.
    path: the output directory.
    dtype: storage dtype of the tensors (e.g. ``"bfloat16"``); defaults to
      ``model.config.param_dtype``.
  """
  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  config = model.config
  if dtype is not None:
    config = dataclasses.replace(config, param_dtype=dtype)
  _, params = llama.split_params(model)
  tensors = params_to_hf(params, config, dtype=config.param_dtype)
  with open(os.path.join(path, CONFIG_FILE), "w") as f:
    json.dump(config_to_hf(config), f, indent=2)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE), metadata={"format": "pt"})
