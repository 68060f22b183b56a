"""A tiny chat model for the fine-tuning tests: byte-level BPE, ChatML template, random LLaMA.

The tokenizer is trained here with the ``tokenizers`` library on the kind of text the tests feed it
(a few hundred pieces, so a prompt with its function list is ~150 tokens); the model is a random
``transformers.LlamaForCausalLM``. Both are written twice: as a GGUF file (llama.cpp's layout,
Q/K rows permuted for adjacent-pair RoPE, tokenizer and chat template in the metadata) and as a
Hugging Face directory (``save_pretrained`` plus ``tokenizer.json`` and ``tokenizer_config.json``).
"""

import json

import numpy as np

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + "
          "message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")

FUNCTIONS = {
    "add": {"name": "add", "description": "Add two integers.",
            "parameters": {"type": "dict", "properties": {
                "a": {"type": "integer", "description": "first"},
                "b": {"type": "integer", "description": "second"}}, "required": ["a", "b"]}},
    "greet": {"name": "greet", "description": "Greet a person.",
              "parameters": {"type": "dict", "properties": {
                  "name": {"type": "string", "description": "who"},
                  "loud": {"type": "boolean", "description": "shout"}}, "required": ["name"]}},
}
NAMES = ["Ada", "Bob", "Cy", "Dee", "Eve", "Fay", "Gus", "Hal"]


def examples(count=24, long_ones=1):
  """BFCL-format records: simple, multiple (two functions offered) and parallel questions."""
  rng = np.random.default_rng(0)
  out = []
  for i in range(count):
    kind = i % 3
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    name = NAMES[i % len(NAMES)]
    if kind == 0:
      question = f"Add {a} and {b}."
      functions = [FUNCTIONS["add"]]
      truth = [{"add": {"a": [a], "b": [b]}}]
    elif kind == 1:
      question = f"Say hello to {name}."
      functions = [FUNCTIONS["add"], FUNCTIONS["greet"]]
      truth = [{"greet": {"name": [name], "loud": ["", False]}}]
    else:
      question = f"Add {a} and {b}, and greet {name} loudly."
      functions = [FUNCTIONS["add"], FUNCTIONS["greet"]]
      truth = [{"add": {"a": [a], "b": [b]}}, {"greet": {"name": [name], "loud": [True]}}]
    out.append({"id": f"tiny_{i}", "question": [[{"role": "user", "content": question}]],
                "function": functions, "ground_truth": truth})
  for i in range(long_ones):
    out.append({"id": f"long_{i}", "question": [[{"role": "user",
                                                   "content": "Add 1 and 2. " * 200}]],
                "function": [FUNCTIONS["add"]], "ground_truth": [{"add": {"a": [1], "b": [2]}}]})
  return out


def write_jsonl(path, records):
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


def train_tokenizer(texts, vocab_size=600):
  """A byte-level BPE trained on ``texts``, with the ChatML control tokens first."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(texts, trainer)
  return tok


def _vocab_and_merges(tok):
  spec = json.loads(tok.to_str())
  vocab = spec["model"]["vocab"]
  tokens = [None] * len(vocab)
  for token, index in vocab.items():
    tokens[index] = token
  merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
  return tokens, merges


def _permute(weight, heads):
  """llama.cpp's converter: rotate-half rows to adjacent pairs, per head."""
  return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
          .swapaxes(1, 2).reshape(weight.shape))


_GGUF_BLOCK = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
               "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_gguf(path, reference, tok):
  """The transformers model and the tokenizer as an F32 GGUF file."""
  import gguf

  cfg = reference.config
  state = {k: v.numpy() for k, v in reference.state_dict().items()}
  writer = gguf.GGUFWriter(str(path), arch="llama")
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
  tokens, merges = _vocab_and_merges(tok)
  writer.add_tokenizer_model("gpt2")
  writer.add_tokenizer_pre("gpt2")
  writer.add_token_list(tokens)
  writer.add_token_types([3 if t in SPECIAL else 1 for t in tokens])
  writer.add_token_merges(merges)
  writer.add_bos_token_id(tokens.index("<|im_start|>"))
  writer.add_eos_token_id(tokens.index("<|im_end|>"))
  writer.add_pad_token_id(tokens.index("<|im_end|>"))
  writer.add_chat_template(CHATML)
  tensors = {"token_embd.weight": state["model.embed_tokens.weight"],
             "output_norm.weight": state["model.norm.weight"],
             "output.weight": state["lm_head.weight"]}
  for i in range(cfg.num_hidden_layers):
    for name, hf_name in _GGUF_BLOCK.items():
      weight = state[f"model.layers.{i}.{hf_name}.weight"]
      if name == "attn_q":
        weight = _permute(weight, cfg.num_attention_heads)
      elif name == "attn_k":
        weight = _permute(weight, cfg.num_key_value_heads)
      tensors[f"blk.{i}.{name}.weight"] = weight
  for name, weight in tensors.items():
    writer.add_tensor(name, np.ascontiguousarray(weight))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  return path


def write_hf_dir(directory, reference, tok):
  """``save_pretrained`` plus the tokenizer files transformers reads."""
  reference.save_pretrained(directory)
  tok.save(str(directory / "tokenizer.json"))
  (directory / "tokenizer_config.json").write_text(json.dumps({
      "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHATML,
      "bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
      "unk_token": "<|endoftext|>"}))
  return directory


def make_model(vocab_size, seed=0):
  import torch
  import transformers

  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
      rope_theta=10000.0, rms_norm_eps=1e-5, initializer_range=0.1, tie_word_embeddings=False)
  return transformers.LlamaForCausalLM(config).eval()
