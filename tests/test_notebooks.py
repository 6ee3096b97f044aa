"""The notebooks run from top to bottom on the CPU (as CI runs them), with the bundled demo model."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.parametrize("name", ["quickstart", "benchmarks", "ray_data"])
def test_notebook_runs(name, monkeypatch):
    monkeypatch.setenv("PAGEDLLM_LOGGING_LEVEL", "WARNING")
    notebook = nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": NOTEBOOKS}}).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if name == "quickstart":
        text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
        assert "found in the cache:" in text and "KV blocks of 16 tokens" in text
        assert sum("image/png" in o.get("data", {}) for o in outputs) == 2  # the two plots
