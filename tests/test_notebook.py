"""The router-pattern notebook runs top to bottom (training two tiny arms itself) and is stored without outputs."""
import os
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "router_patterns.ipynb"
BUDGET_S = 180  # the whole notebook, every cell included, on the shared 2-core CPU


def test_notebook_is_stored_without_outputs():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code, "the notebook has no code cells"
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, f"stored output in cell:\n{cell.source[:80]}"


def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch):
    # the kernel is a fresh process in tmp_path: it imports the checkout's packages via PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for name in ("MOS_RUN", "MOS_RUN_B"):  # no run given: the notebook trains its two tiny arms
        monkeypatch.delenv(name, raising=False)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    deadline = time.monotonic() + BUDGET_S
    client = NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}},
                            timeout_func=lambda cell: max(1, int(deadline - time.monotonic())))
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on any error, CellTimeoutError past the budget
    print(f"notebook executed in {time.perf_counter() - start:.1f} s")
    outputs = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs]
    assert not [out for out in outputs if out.output_type == "error"]
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert len(images) >= 9, f"expected the router figures as PNG outputs, got {len(images)}"
    assert list((tmp_path / "router_runs" / "router_inputs").glob("*/checkpoints/*.ckpt")), "no tiny arm trained"
    text = "".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for out in outputs)
    assert "router/entropy" in text and "prompt_latent_timestep" in text
