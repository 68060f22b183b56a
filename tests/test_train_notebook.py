"""notebooks/quickstart.ipynb runs top to bottom at a tiny size (QUICKSTART_TINY=1)."""

import os
import pathlib

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = pathlib.Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"


def test_quickstart_notebook_is_colab_ready():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  text = "\n".join(cell.source for cell in nb.cells)
  assert "colab.research.google.com" in text and "colab-badge.svg" in text
  assert '"pip", "install", "-q", "-e"' in text and "find_spec(\"ngalore_jax\")" in text
  assert "git+" not in text
  assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code")


@pytest.mark.slow
def test_quickstart_notebook_executes(monkeypatch, tmp_path):
  monkeypatch.setenv("QUICKSTART_TINY", "1")
  # The kernel imports the checkout (skipping the install cell) on one CPU device.
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
      p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                   resources={"metadata": {"path": str(NOTEBOOK.parent)}})
  client.execute()
  outputs = "\n".join(
      out.get("text", "") for cell in nb.cells if cell.cell_type == "code"
      for out in cell.get("outputs", []) if out.get("output_type") == "stream")
  assert "ngalore_jax ready" in outputs
  assert outputs.count("held-out perplexity") >= 3
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]
  assert len(images) == 2
