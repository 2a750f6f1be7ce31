"""The quickstart notebook runs top to bottom in a real kernel (small), and its saved outputs tell the story."""

import json
import re
from pathlib import Path

import nbformat
import pytest
import ray
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).parents[1] / "notebooks" / "quickstart.ipynb"


def test_the_saved_notebook_has_its_outputs_and_plots():
    cells = [cell for cell in json.loads(NOTEBOOK.read_text())["cells"] if cell["cell_type"] == "code"]
    run_in_order = [cell["execution_count"] for cell in cells] == list(range(1, len(cells) + 1))
    assert run_in_order, "run the notebook top to bottom and save it with its outputs"
    images = [output for cell in cells for output in cell["outputs"] if "image/png" in output.get("data", {})]
    assert len(images) >= 3  # the likelihood histograms, the per-layer features, the ROC curves
    assert not any(output.get("output_type") == "error" for cell in cells for output in cell["outputs"])


def test_the_notebook_uses_only_the_public_api():
    """`import fimood` and its top-level names: nothing from the package's inner modules."""
    code = "".join("".join(cell["source"]) for cell in json.loads(NOTEBOOK.read_text())["cells"])
    inner = re.findall(r"^\s*(?:from fimood[.\w]* import .*|import fimood\.\S+)", code, flags=re.MULTILINE)
    assert "import fimood" in code and not inner, inner
    import fimood

    used = set(re.findall(r"\bfimood\.(\w+)", code))
    assert used <= set(fimood.__all__), used - set(fimood.__all__)


@pytest.mark.slow
def test_the_notebook_runs_in_a_kernel(ray_session, monkeypatch, tmp_path):
    monkeypatch.setenv("FIMOOD_QUICKSTART_SMALL", "1")
    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)  # the session's loopback cluster
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    text = "".join(output.get("text", "") for cell in notebook.cells for output in cell.get("outputs", []))
    assert "likelihood AUROC (NLL as the OOD score)" in text and "date=2026-11-26: 200 rows" in text
    assert "largest relative difference of the gradient features" in text
