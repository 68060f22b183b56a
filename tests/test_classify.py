"""python -m train.classify: TSV reading, metrics, error lines and an end-to-end run with resume.

The end-to-end run uses a tiny random BERT written by transformers (test-only) and a word-level
tokenizer.json built here with ``tokenizers``; nothing is downloaded.
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from train import classify
from train import classify_data
from train.classify_data import Example

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSITIVE = ["good", "great", "fine", "lovely", "superb", "charming"]
NEGATIVE = ["bad", "awful", "dull", "tedious", "boring", "messy"]
FILLER = ["the", "movie", "is", "very", "quite", "plot", "a"]


# The TSV reader.


def _write(path, text):
  path.write_text(text, encoding="utf-8")
  return path


def test_read_tsv_single_sentences(tmp_path):
  path = _write(tmp_path / "train.tsv",
                "sentence\tlabel\nit 's a charming journey .\t1\n\nunfunny and dull\t0\n")
  assert classify_data.read_tsv(path, ("0", "1")) == [
      Example("it 's a charming journey .", None, 1), Example("unfunny and dull", None, 0)]


def test_read_tsv_pairs_by_column_name(tmp_path):
  path = _write(tmp_path / "dev.tsv",
                "index\tsentence1\tsentence2\tlabel\n"
                "0\tA man plays.\tSomeone plays.\tentailment\n"
                "1\tIt rains.\tThe sun shines.\tnot_entailment\n")
  assert classify_data.read_tsv(path, ("entailment", "not_entailment")) == [
      Example("A man plays.", "Someone plays.", 0), Example("It rains.", "The sun shines.", 1)]


def test_read_tsv_errors_name_the_problem(tmp_path):
  no_label = _write(tmp_path / "a.tsv", "sentence\tscore\nfine\t1\n")
  with pytest.raises(classify_data.DataError, match=r"a.tsv: the header line has no column "
                                                    r"label \(columns: sentence, score\)"):
    classify_data.read_tsv(no_label, ("0", "1"))
  bad_label = _write(tmp_path / "b.tsv", "sentence\tlabel\nfine\t1\nworse\t2\n")
  with pytest.raises(classify_data.DataError,
                     match=r"b.tsv:3: label '2' is not one of the classes 0, 1"):
    classify_data.read_tsv(bad_label, ("0", "1"))
  short = _write(tmp_path / "c.tsv", "sentence1\tsentence2\tlabel\nonly one\n")
  with pytest.raises(classify_data.DataError, match=r"c.tsv:2: 1 tab-separated fields"):
    classify_data.read_tsv(short, ("0", "1"))


def test_sentiment_snippets_and_split():
  data = ("1\t2.26\tThe Rock is destined to be great.\r\n2\t-0.6\tEffective but too tepid.\r\n"
          "3\t0.0\tNeither here nor there.\r\n")
  read = classify_data._read_snippets  # pylint: disable=protected-access
  examples = read(data.encode(), "snippets")
  assert examples == [Example("The Rock is destined to be great.", None, 1),
                      Example("Effective but too tepid.", None, 0)]
  sentences = [f"sentence number {i}" for i in range(1000)]
  held = [s for s in sentences if classify_data.is_held_out(s)]
  assert 60 < len(held) < 140  # about 10%
  train, held_out = classify_data.split([Example(s, None, 0) for s in sentences])
  assert [e.text for e in held_out] == held and len(train) + len(held_out) == 1000


# Metrics against hand-computed values and NumPy formulas.


def test_binary_metrics_by_hand():
  labels = np.array([1, 1, 1, 0, 0, 0, 1, 0])
  predictions = np.array([1, 0, 1, 0, 1, 0, 1, 1])
  # TP 3, FN 1, FP 2, TN 2.
  assert classify.accuracy(labels, predictions) == 5 / 8
  assert classify.f1_score(labels, predictions) == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
  mcc = (3 * 2 - 2 * 1) / np.sqrt((3 + 2) * (3 + 1) * (2 + 2) * (2 + 1))
  assert classify.matthews_corrcoef(labels, predictions) == pytest.approx(mcc)
  assert mcc == pytest.approx(np.corrcoef(labels, predictions)[0, 1])  # the phi coefficient
  assert classify.classification_metrics(labels, predictions, 2) == pytest.approx(
      {"eval_accuracy": 5 / 8, "eval_f1": 2 / 3, "eval_mcc": mcc})


def test_metric_edge_cases():
  ones = np.ones(4, int)
  assert classify.matthews_corrcoef(np.array([0, 1, 0, 1]), ones) == 0.0  # one predicted class
  assert classify.f1_score(np.zeros(3, int), np.zeros(3, int)) == 0.0  # no positives at all
  assert classify.matthews_corrcoef(np.array([0, 1, 1]), np.array([1, 0, 0])) == -1.0


def test_multiclass_mcc_is_the_correlation_of_one_hot_assignments():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 200)
  predictions = np.where(rng.random(200) < 0.6, labels, rng.integers(0, 3, 200))
  x, y = np.eye(3)[labels], np.eye(3)[predictions]
  x, y = x - x.mean(0), y - y.mean(0)
  want = (x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum())
  assert classify.matthews_corrcoef(labels, predictions, 3) == pytest.approx(want)
  assert classify.accuracy(labels, predictions) == np.mean(labels == predictions)
  assert "eval_f1" not in classify.classification_metrics(labels, predictions, 3)


def test_lora_trains_the_head():
  config = classify.from_argv(["--optimizer", "lora", "--data", "x.tsv"])
  assert config.optimizer.rank == classify.DEFAULT_RANK
  param = classify.parametrization(config)
  ones, zeros = np.ones, np.zeros
  params = {"encoder": {"layers": {0: {"attn": {"q": {"kernel": ones((4, 4), np.float32),
                                                       "bias": zeros(4, np.float32)}}}}},
            "head": {"kernel": ones((4, 2), np.float32), "bias": zeros(2, np.float32)}}
  held = param.init(params, jax.random.key(0))
  trainable, frozen = param.split(held)
  assert sorted(trainable) == ["adapters", "head"] and "head" not in frozen["base"]
  assert param.combine(trainable, frozen)["base"]["head"] is params["head"]
  assert classify.from_argv(["--rank", "4", "--data", "x.tsv"]).optimizer.rank == 4


# The command line, as a subprocess.


def _tokenizer_json(path, words):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
  tok = tokenizers.Tokenizer(tokenizers.models.WordPiece(vocab, unk_token="[UNK]"))
  tok.normalizer = tokenizers.normalizers.BertNormalizer(lowercase=True)
  tok.pre_tokenizer = tokenizers.pre_tokenizers.BertPreTokenizer()
  tok.post_processor = tokenizers.processors.TemplateProcessing(
      single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
      special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(path / "tokenizer.json"))
  return len(vocab)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
  """A random 1-layer BERT (width 32) saved by transformers, with a word-level tokenizer."""
  transformers = pytest.importorskip("transformers")
  torch = pytest.importorskip("torch")
  path = tmp_path_factory.mktemp("tiny_bert")
  vocab_size = _tokenizer_json(path, POSITIVE + NEGATIVE + FILLER)
  torch.manual_seed(0)
  transformers.BertModel(transformers.BertConfig(
      vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=4, max_position_embeddings=32)).save_pretrained(path)
  return path


def _sentences(n, seed):
  rng = np.random.default_rng(seed)
  lines = ["sentence\tlabel"]
  for _ in range(n):
    label = int(rng.integers(0, 2))
    words = list(rng.choice(FILLER, 3)) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    lines.append(f"{' '.join(words)}\t{label}")
  return "\n".join(lines) + "\n"


def _run(*args, cwd=None, compilation_cache=None):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
  if compilation_cache:  # the resumed run reuses the first run's compiled steps
    env.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  # One CPU device (not the 8 fake ones of conftest); little XLA optimisation: compiling
  # dominates these few-step runs.
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return subprocess.Popen([sys.executable, "-m", "train.classify", "--no-progress", *args],
                          cwd=cwd or ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)


def _finish(proc, timeout=300):
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def test_bad_input_is_one_error_line(tmp_path, tiny_bert):
  no_columns = _write(tmp_path / "cols.tsv", "text\tlabel\nfine\t1\n")
  bad_label = _write(tmp_path / "label.tsv", "sentence\tlabel\nfine\t1\nworse\tpositive\n")
  llama_dir = tmp_path / "llama"
  llama_dir.mkdir()
  _write(llama_dir / "config.json", json.dumps({"model_type": "llama"}))
  good = _write(tmp_path / "good.tsv", _sentences(20, 0))
  common = ["--workdir", str(tmp_path / "run"), "--seq-len", "16"]
  cases = {
      "columns": (["--init", str(tiny_bert), "--data", str(no_columns)],
                  "the header line has no column sentence (columns: text, label)"),
      "label": (["--init", str(tiny_bert), "--data", str(bad_label)],
                "label.tsv:3: label 'positive' is not one of the classes 0, 1 (--labels)"),
      "init": (["--init", str(llama_dir), "--data", str(good)],
               "model_type 'llama' is not a BERT checkpoint"),
  }
  procs = {name: _run(*args, *common) for name, (args, _) in cases.items()}
  for name, proc in procs.items():
    code, _, err = _finish(proc)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
    assert cases[name][1] in lines[0], (name, lines[0])
  assert not (tmp_path / "run").exists()


def test_more_error_lines_in_process(tmp_path, tiny_bert, capsys):
  good = _write(tmp_path / "good.tsv", _sentences(20, 0))
  common = ["--init", str(tiny_bert), "--workdir", str(tmp_path / "run"), "--seq-len", "16",
            "--no-progress"]
  cases = [
      (["--data", str(good), "--optimizer", "low_rank"],
       "error: --optimizer low_rank replaces the pretrained kernels"),
      (["--task", "glue/sst2", "--data-dir", str(tmp_path)], "error: --task glue/sst2: "),
      (["--data", str(good), "--seq-len", "64"],
       "error: --seq-len 64 exceeds the encoder's maximum positions (32)"),
  ]
  for args, message in cases:
    assert classify.main(common + args) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(message), lines
  assert not (tmp_path / "run").exists()


def test_end_to_end_natural_galore_resumes(tmp_path, tiny_bert):
  train = _write(tmp_path / "train.tsv", _sentences(48, 1))
  dev = _write(tmp_path / "dev.tsv", _sentences(10, 2))
  workdir = tmp_path / "run"
  args = ["--init", str(tiny_bert), "--data", str(train), "--eval-data", str(dev),
          "--optimizer", "natural_galore", "--rank", "4", "--update-proj-gap", "2",
          "--steps", "4", "--warmup-steps", "1", "--batch-size", "4", "--seq-len", "12",
          "--lr", "1e-3", "--log-every", "1", "--eval-every", "2", "--checkpoint-every", "2",
          "--workdir", str(workdir)]
  cache = tmp_path / "xla_cache"
  code, out, err = _finish(_run(*args, "--stop-at", "2", compilation_cache=cache))
  assert code == 0, err
  assert "Stopped at step 2/4" in out
  code, out, err = _finish(_run(*args, compilation_cache=cache))
  assert code == 0, err
  assert "Finished 4/4 steps. (resumed from step 2)" in out and "held-out accuracy" in out
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
  evaluations = [r for r in records if "eval_accuracy" in r]
  assert [r["step"] for r in evaluations] == [0, 2, 4]
  for record in evaluations:
    assert 0 <= record["eval_accuracy"] <= 1 and {"eval_f1", "eval_mcc", "eval_loss"} <= set(
        record)
    assert record["eval_accuracy"] * 10 == pytest.approx(round(record["eval_accuracy"] * 10))
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["resumed_from"] == 2 and resolved["train"]["optimizer"]["rank"] == 4
  assert resolved["dataset"]["examples"] == 48 and resolved["eval_dataset"]["examples"] == 10
  assert sorted(os.listdir(workdir / "checkpoints")) == ["2", "4"]
