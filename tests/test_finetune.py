"""python -m train.finetune end to end on a tiny chat model, and LoRA, against transformers.

The model and tokenizer are made here (tests/finetune_fixtures.py): a random transformers LLaMA
written as a GGUF file and as a Hugging Face directory, with a byte-level BPE trained on the test
data and a ChatML template. References: transformers (its chat template rendering, its forward
pass for the masked loss and for the exported checkpoint) and literal expected answers.
"""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import finetune_fixtures as ff
from models import llama
from train import bfcl
from train import build
from train import checkpointing
from train import finetune
from train import lora as lora_lib
from train import metrics as metrics_lib
from train import pretrain
from train import steps

torch = pytest.importorskip("torch", reason="torch is the reference (dev extra)")
transformers = pytest.importorskip("transformers", reason="transformers is the reference")

STEPS = 4
SEQ_LEN = 320


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """``{"gguf", "hf", "data", "eval", "reference"}``: the tiny model twice, the data, the model."""
  root = tmp_path_factory.mktemp("finetune")
  records = ff.examples(count=24, long_ones=1)
  data = ff.write_jsonl(root / "data.jsonl", records[:18] + records[-1:])  # the long one too
  held_out = ff.write_jsonl(root / "eval.jsonl", records[18:24])
  parsed = bfcl.read_examples(data) + bfcl.read_examples(held_out)
  texts = [ff.CHATML] + [bfcl.system_prompt(e.functions) + m["content"] + bfcl.target_text(e)
                         for e in parsed for m in e.messages]
  tok = ff.train_tokenizer(texts * 3)
  reference = ff.make_model(tok.get_vocab_size())
  hf_dir = root / "hf"
  hf_dir.mkdir()
  return {"gguf": ff.write_gguf(root / "tiny.gguf", reference, tok),
          "hf": ff.write_hf_dir(hf_dir, reference, tok), "data": data, "eval": held_out,
          "reference": reference, "root": root}


def _args(files, workdir, optimizer, *extra, init="gguf"):
  return ["--init", str(files[init]), "--data", str(files["data"]), "--eval-data",
          str(files["eval"]), "--optimizer", optimizer, "--steps", str(STEPS),
          "--warmup-steps", "1", "--batch-size", "4", "--seq-len", str(SEQ_LEN), "--lr", "1e-2",
          "--rank", "4", "--update-proj-gap", "2", "--history-size", "2", "--eval-every", "2",
          "--eval-batches", "1", "--eval-examples", "2", "--max-new-tokens", "12",
          "--log-every", "1", "--checkpoint-every", "2", "--no-progress", "--mesh", "data=1",
          "--workdir", str(workdir), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, files):
  """Runs each optimizer once (cached): name -> (exit code, workdir, stdout, stderr)."""
  done = {}

  def run(optimizer, capsys):
    if optimizer not in done:
      workdir = tmp_path_factory.mktemp(optimizer) / "run"
      extra = ["--export-hf", str(workdir.parent / "export")] if optimizer == "lora" else []
      init = "hf" if optimizer == "natural_galore" else "gguf"
      code = finetune.main(_args(files, workdir, optimizer, *extra, init=init))
      out, err = capsys.readouterr()
      done[optimizer] = code, workdir, out, err
    return done[optimizer]

  return run


def _metrics(workdir, key):
  return {r["step"]: r[key] for r in metrics_lib.read_metrics(workdir / "metrics.jsonl")
          if r.get(key) is not None}


# The data: prompt rendering and the loss mask.


def test_loss_mask_selects_the_answer_and_end_of_turn_only(files):
  init = finetune.load_init(str(files["gguf"]))
  tok = init.tokenizer
  examples = {e.id: e for e in bfcl.read_examples(files["data"])}
  chosen = [examples["tiny_0"], examples["tiny_1"], examples["tiny_2"]]
  data = finetune.ChatData([finetune.encode(tok, e) for e in chosen], seq_len=SEQ_LEN,
                           pad_id=tok.pad_id, name="t")
  batch = data.rows([0, 1, 2, None])
  tokens, mask = batch["tokens"], batch["mask"]
  assert tokens.shape == (4, SEQ_LEN + 1) and mask.shape == (4, SEQ_LEN)
  assert not mask[3].any()
  records = {r["id"]: r for r in ff.examples()}
  a0, b0 = (records["tiny_0"]["ground_truth"][0]["add"][k][0] for k in "ab")
  a2, b2 = (records["tiny_2"]["ground_truth"][0]["add"][k][0] for k in "ab")
  expected = [  # written out by hand: first values, the optional "loud" of tiny_1 left out
      f'[{{"name": "add", "arguments": {{"a": {a0}, "b": {b0}}}}}]',
      '[{"name": "greet", "arguments": {"name": "Bob"}}]',
      f'[{{"name": "add", "arguments": {{"a": {a2}, "b": {b2}}}}}, '
      '{"name": "greet", "arguments": {"name": "Cy", "loud": true}}]',
  ]
  hf_tok = transformers.AutoTokenizer.from_pretrained(files["hf"])
  for row, (example, answer) in enumerate(zip(chosen, expected)):
    targets = tokens[row, 1:]
    selected = np.flatnonzero(mask[row])
    assert tok.decode(targets[selected]) == answer + "<|im_end|>"
    # The selected targets are one contiguous run right after the prompt, which transformers
    # renders and tokenises to the same ids.
    prompt_ids = hf_tok.apply_chat_template(bfcl.conversation(example),
                                            add_generation_prompt=True, tokenize=True)
    prompt_ids = list(getattr(prompt_ids, "input_ids", prompt_ids))
    assert tokens[row, :len(prompt_ids)].tolist() == prompt_ids
    assert selected.tolist() == list(range(len(prompt_ids) - 1, selected[-1] + 1))
    assert (tokens[row, selected[-1] + 2:] == tok.pad_id).all()


def test_masked_loss_equals_transformers_on_the_answer_tokens(files):
  init = finetune.load_init(str(files["gguf"]))
  examples = bfcl.read_examples(files["data"])[:3]
  data = finetune.ChatData([finetune.encode(init.tokenizer, e) for e in examples],
                           seq_len=SEQ_LEN, pad_id=init.tokenizer.pad_id, name="t")
  batch = data.rows([0, 1, 2])
  graphdef, _ = llama.abstract_params(init.model_config)
  ours = steps.masked_cross_entropy(graphdef, init.load_params(),
                                    jax.tree.map(jnp.asarray, batch))
  with torch.no_grad():
    logits = files["reference"](torch.tensor(batch["tokens"][:, :-1], dtype=torch.long)).logits
    losses = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), torch.tensor(batch["tokens"][:, 1:], dtype=torch.long).reshape(-1),
        reduction="none").numpy()
  mask = batch["mask"].reshape(-1).astype(bool)
  np.testing.assert_allclose(float(ours), losses[mask].mean(), rtol=1e-5)
  assert abs(losses[mask].mean() - losses.mean()) > 1e-3  # the mask matters


# End to end.


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "lora", "natural_galore"])
def test_end_to_end(optimizer, runs, files, capsys):
  code, workdir, out, err = runs(optimizer, capsys)
  assert code == 0, err
  assert "held-out accuracy" in out and "predictions" in out
  assert "skipped 1 of 19 training examples longer than --seq-len 320 tokens" in err
  records = metrics_lib.read_metrics(workdir / "metrics.jsonl")
  assert [r["step"] for r in records] == list(range(STEPS + 1))
  evals = [r for r in records if "eval_accuracy" in r]
  assert [r["step"] for r in evals] == [0, 2, 4]
  assert all(0 <= r["eval_accuracy"] <= 1 and np.isfinite(r["eval_loss"]) for r in evals)
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]  # it learns the answers
  held_out = {e.id: e for e in bfcl.read_examples(files["eval"])}
  for step in (0, 2, 4):
    lines = (workdir / "predictions" / f"step_{step}.jsonl").read_text().splitlines()
    predictions = [json.loads(line) for line in lines]
    assert [p["id"] for p in predictions] == ["tiny_18", "tiny_19"]
    for p in predictions:
      assert set(p) == {"id", "output", "calls", "correct"} and isinstance(p["output"], str)
      assert p["calls"] is None or isinstance(p["calls"], list)
      assert p["correct"] == bfcl.check_example(p["calls"], held_out[p["id"]])
  resolved = json.loads((workdir / "config.json").read_text())
  assert resolved["train"]["optimizer"]["name"] == optimizer
  assert resolved["dataset"]["examples"] == 18 and resolved["dataset"]["skipped_too_long"] == 1


@pytest.mark.slow
def test_lora_trains_only_adapters_and_counts_their_memory(runs, files, capsys):
  code, workdir, _, _ = runs("lora", capsys)
  assert code == 0
  resolved = json.loads((workdir / "config.json").read_text())
  # Independent count: per layer q 32x32, k 32x16, v 32x16, o 32x32, gate/up 32x64, down 64x32.
  shapes = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)] * 2
  adapter_bytes = sum((i + o) * 4 * 4 for i, o in shapes)  # rank 4, float32
  memory = resolved["memory_bytes"]
  assert memory["adapters"] == memory["trainable_params"] == adapter_bytes
  # Adam's mu and nu on the adapters, and two int32 step counts (Adam's, the schedule's).
  assert memory["optimizer_state"]["total"] == 2 * adapter_bytes + 8
  assert resolved["trainable_params"] == adapter_bytes // 4
  # The base is the GGUF's weights, unchanged; the adapters moved away from B = 0.
  s = finetune.setup(finetune.from_argv(_args(files, workdir, "lora")))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  state, _ = ckpt.restore(STEPS, s.abstract_state)
  ckpt.close()
  base = finetune.load_init(str(files["gguf"])).load_params()
  jax.tree.map(np.testing.assert_array_equal, state.params["base"], base)
  b = state.params["adapters"]["blocks"][0]["attn"]["q"]["kernel"]["lora_b"]
  assert float(jnp.abs(b).max()) > 0


@pytest.mark.slow
def test_lora_export_is_the_merged_model_in_transformers(runs, files, capsys):
  code, workdir, out, _ = runs("lora", capsys)
  assert code == 0
  export = workdir.parent / "export"
  s = finetune.setup(finetune.from_argv(_args(files, workdir, "lora")))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  state, _ = ckpt.restore(STEPS, s.abstract_state)
  ckpt.close()
  tokens = np.random.default_rng(0).integers(0, s.model_config.vocab_size, (2, 24))
  adapted = np.asarray(llama.apply(s.graphdef, steps.model_params(state.params, s.parametrization),
                                   jnp.asarray(tokens)))
  base = np.asarray(llama.apply(s.graphdef, state.params["base"], jnp.asarray(tokens)))
  assert np.abs(adapted - base).max() > 1e-3  # the adapters change the model
  model = transformers.AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.tensor(tokens)).logits.numpy()
  np.testing.assert_allclose(theirs, adapted, rtol=1e-4, atol=1e-4)
  # The tokenizer files: transformers renders and tokenises prompts as the run did.
  hf_tok = transformers.AutoTokenizer.from_pretrained(export)
  example = bfcl.read_examples(files["eval"])[0]
  ids = hf_tok.apply_chat_template(bfcl.conversation(example), add_generation_prompt=True)
  ids = list(getattr(ids, "input_ids", ids))
  encoded = finetune.encode(s.tokenizer, example)
  assert ids == list(encoded.ids[:encoded.prompt_len])
  assert json.loads((export / "generation_config.json").read_text())["eos_token_id"] == [
      hf_tok.convert_tokens_to_ids("<|im_end|>")]
  # And the export is an --init again.
  again = finetune.load_init(str(export))
  assert again.kind == "hf" and again.model_config == s.model_config
  assert again.tokenizer.stop_ids == s.tokenizer.stop_ids


@pytest.mark.slow
def test_stop_and_resume_is_bit_identical(runs, files, tmp_path, capsys):
  code, reference, _, _ = runs("lora", capsys)
  assert code == 0
  workdir = tmp_path / "run"
  assert finetune.main(_args(files, workdir, "lora", "--stop-at", "2")) == 0
  assert "Stopped at step 2/4" in capsys.readouterr().out
  assert finetune.main(_args(files, workdir, "lora")) == 0
  for key in ("train_loss", "eval_loss", "eval_accuracy", "grad_norm"):
    assert _metrics(workdir, key) == _metrics(reference, key), key
  for step in (2, 4):
    name = f"predictions/step_{step}.jsonl"
    assert (workdir / name).read_text() == (reference / name).read_text()


# Bad input: one line each, exit status 2.


def _error(capsys, argv):
  code = finetune.main(argv)
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count("\n") == 0, err
  return err


def test_bad_data_lines_name_file_and_line(files, tmp_path, capsys):
  records = ff.examples(count=3, long_ones=0)
  del records[1]["ground_truth"]
  missing = ff.write_jsonl(tmp_path / "missing.jsonl", records)
  args = _args(files, tmp_path / "w", "adamw")
  args[args.index("--data") + 1] = str(missing)
  assert _error(capsys, args) == f"error: {missing}:2: missing field 'ground_truth' (each line " \
                                  "needs id, question, function, ground_truth)"
  broken = tmp_path / "broken.jsonl"
  broken.write_text(json.dumps(ff.examples(1, 0)[0]) + "\n{\"id\": \"x\",\n")
  args[args.index("--data") + 1] = str(broken)
  assert _error(capsys, args).startswith(f"error: {broken}:2: invalid JSON")


def test_an_init_that_is_no_llama_is_one_line(files, tmp_path, capsys):
  text = tmp_path / "notes.txt"
  text.write_text("hello")
  args = _args(files, tmp_path / "w", "adamw")
  args[args.index("--init") + 1] = str(text)
  assert _error(capsys, args) == (f"error: --init {text}: neither a GGUF file nor a Hugging Face "
                                  "LLaMA directory")
  bert = tmp_path / "bert"
  bert.mkdir()
  (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
  args[args.index("--init") + 1] = str(bert)
  assert _error(capsys, args) == (f"error: --init {bert}: model_type 'bert' in config.json is "
                                  "not a Hugging Face LLaMA ('llama')")
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(json.dumps({"model_type": "llama"}))
  args[args.index("--init") + 1] = str(empty)
  assert _error(capsys, args) == (f"error: --init {empty}: neither model.safetensors nor "
                                  "model.safetensors.index.json in the directory")
  args[args.index("--init") + 1] = str(tmp_path / "nowhere.gguf")
  assert "no such file or directory" in _error(capsys, args)


def test_flags_are_shared_with_pretraining(capsys):
  with pytest.raises(SystemExit):
    finetune.main(["--help"])
  text = capsys.readouterr().out
  for flag in ("--steps", "--batch-size", "--seq-len", "--lr", "--warmup-steps", "--rank",
               "--update-proj-gap", "--scale", "--history-size", "--damping", "--workdir",
               "--seed", "--mesh", "--checkpoint-every", "--eval-every", "--no-progress",
               "--lora-alpha", "--init", "--data", "--eval-data", "--task", "--export-hf"):
    assert flag in text, flag
  for name in ("adamw", "galore", "natural_galore", "fira", "apollo", "lora"):
    assert name in text
  config = finetune.from_argv(["--optimizer", "lora", "--rank", "8", "--lora-alpha", "4"])
  assert (config.optimizer.rank, config.optimizer.lora_alpha) == (8, 4.0)
  assert config.resolved_workdir() == os.path.join("runs", "finetune-bfcl-lora")


# LoRA itself.


def test_lora_merge_is_base_plus_scaled_product():
  rng = np.random.default_rng(0)
  params = {"blocks": {0: {"attn": {"q": {"kernel": rng.normal(size=(6, 4)).astype(np.float32)}},
                           "attn_norm": {"scale": np.ones(6, np.float32)}}},
            "embed": {"embedding": rng.normal(size=(10, 6)).astype(np.float32)}}
  lora = lora_lib.LoRA(rank=3, alpha=6.0)
  held = lora.init(jax.tree.map(jnp.asarray, params), jax.random.key(1))
  pair = held["adapters"]["blocks"][0]["attn"]["q"]["kernel"]
  a = np.asarray(pair["lora_a"])
  assert a.shape == (6, 3) and np.abs(a).max() <= 1 / math.sqrt(6) and a.std() > 0
  assert not np.asarray(pair["lora_b"]).any()
  b = rng.normal(size=(3, 4)).astype(np.float32)
  pair["lora_b"] = jnp.asarray(b)
  merged = lora.merge(held)
  np.testing.assert_allclose(merged["blocks"][0]["attn"]["q"]["kernel"],
                             params["blocks"][0]["attn"]["q"]["kernel"] + 2.0 * a @ b, rtol=1e-6)
  np.testing.assert_array_equal(merged["embed"]["embedding"], params["embed"]["embedding"])
  trainable, frozen = lora_lib.LoRA(rank=3, alpha=6.0, others="trained").split(held)
  assert set(trainable) == {"adapters", "others"} and "q" not in str(trainable["others"])
  assert lora_lib.LoRA(rank=3, alpha=6.0, others="trained").combine(trainable, frozen).keys() == \
      held.keys()


@pytest.mark.slow
def test_pretraining_with_lora_trains_adapters_and_the_unadapted_weights(tmp_path):
  corpus = tmp_path / "docs.jsonl"
  rng = np.random.default_rng(0)
  words = ["the", "cat", "sees", "a", "dog", "moon", "likes"]
  corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 40))}) + "\n"
                            for _ in range(200)))
  workdir = tmp_path / "run"
  args = ["--override", "num_layers=1", "--override", "hidden_size=32",
          "--override", "intermediate_size=64", "--override", "max_position_embeddings=32",
          "--dataset", f"text:{corpus}", "--steps", "3", "--warmup-steps", "1",
          "--batch-size", "4", "--seq-len", "16", "--optimizer", "lora", "--rank", "2",
          "--lora-others", "trained", "--eval-batches", "1", "--checkpoint-every", "1",
          "--no-progress", "--mesh", "data=1",
          "--workdir", str(workdir)]
  assert pretrain.main(args) == 0
  from train import config as config_lib
  s = build.setup(config_lib.from_argv(args))
  ckpt = checkpointing.Checkpointer(workdir / "checkpoints")
  first, last = (ckpt.restore(step, s.abstract_state)[0].params for step in (1, 3))
  ckpt.close()
  np.testing.assert_array_equal(  # adapted kernels are frozen ...
      first["base"]["blocks"][0]["mlp"]["up"]["kernel"],
      last["base"]["blocks"][0]["mlp"]["up"]["kernel"])
  assert not np.array_equal(first["adapters"]["blocks"][0]["mlp"]["up"]["kernel"]["lora_b"],
                            last["adapters"]["blocks"][0]["mlp"]["up"]["kernel"]["lora_b"])
  assert not np.array_equal(first["base"]["embed"]["embedding"],
                            last["base"]["embed"]["embedding"])  # ... and the others train
