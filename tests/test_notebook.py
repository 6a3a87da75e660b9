"""experiments/colab_demo.ipynb executes top to bottom (tiny budget) and shows what it promises."""

import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_colab_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
  nb = nbformat.read(ROOT / "experiments/colab_demo.ipynb", as_version=4)
  monkeypatch.setenv("RLHB_NOTEBOOK_BUDGET", "tiny")
  monkeypatch.setenv("RLHB_NOTEBOOK_WORKDIR", str(tmp_path / "run"))
  monkeypatch.setenv("RLHB_HF_DIR", str(tmp_path / "no-such-checkpoint"))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  monkeypatch.delenv("XLA_FLAGS", raising=False)  # one CPU device, like a user's runtime
  client = NotebookClient(
    nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
  )
  client.execute()  # raises CellExecutionError on the first failing cell
  outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
  text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert images, "the plots cell shows the pipeline's PNGs inline"
  assert '"like_rate"' in text  # the summary
  assert '"records_rejected": 1' in text  # the bad line of the sample log was quarantined
  assert "not found; skipping" in text
  assert (tmp_path / "run" / "summary.json").exists()
