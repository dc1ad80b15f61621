"""notebooks/: each runs top to bottom in a real Jupyter kernel on the tiny test bundle, and is
committed without outputs.

The kernel is ipykernel in this interpreter (jupyter_client's native ``python3`` kernel runs
``sys.executable``), so no kernelspec is installed; it inherits the environment, so it imports
the same ``ldm_core``. Parameters are set as papermill would: the cell tagged ``parameters``
is replaced by the test's values before the run.
"""

from __future__ import annotations

import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from tests.harness.configs import tiny_config
from tests.harness.data import random_bundle, tiny_cache

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))
EXPLORE = NOTEBOOKS[0].with_name("explore_bundle.ipynb")
BUDGET_S = 60.0
"""The walkthrough on the tiny bundle, kernel start included."""


def _with_parameters(nb: nbformat.NotebookNode, **values: object) -> nbformat.NotebookNode:
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "one cell tagged 'parameters'"
    known = {line.split("=")[0].strip() for line in cells[0].source.splitlines() if "=" in line}
    assert set(values) <= known, f"not parameters of the notebook: {set(values) - known}"
    cells[0].source += "\n" + "\n".join(f"{k} = {v!r}" for k, v in values.items())
    return nb


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_a_committed_notebook_has_no_outputs(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


def test_the_walkthrough_runs_top_to_bottom_on_the_tiny_bundle(tmp_path):
    bundle = random_bundle(tmp_path / "bundle", tiny_config())
    cache = tiny_cache(tmp_path / "cache")
    nb = _with_parameters(
        nbformat.read(EXPLORE, as_version=4),
        BUNDLE=str(bundle),
        DATA=str(cache),
        NUM_SAMPLES=2,
        STEPS=2,
    )
    started = time.monotonic()
    NotebookClient(
        nb, timeout=120, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    elapsed = time.monotonic() - started
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    text = "".join(out.get("text", "") for out in outputs)
    pictures = [out for out in outputs if "image/png" in out.get("data", {})]
    # generated slices, real vs generated, the histograms, the served volumes
    assert len(pictures) == 4, text
    assert "volume (2, 1, 32, 32, 32) from bundle" in text
    digest = text.split("from bundle ")[1].split()[0]
    assert f"the lineage's bundle: {digest}" in text
    assert "needs a cluster: set KFP_HOST" in text and "stopped the local server" in text
    assert elapsed < BUDGET_S, f"the walkthrough took {elapsed:.0f} s"
