"""The router-pattern notebook runs top to bottom on given runs, its no-run default trains two tiny arms, and it
is stored without outputs."""
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


@pytest.mark.slow  # a Jupyter kernel that samples both arms with 8 steps
def test_notebook_runs_top_to_bottom(tmp_path, monkeypatch, router_inputs_run):
    """On two arms of the session's tiny fit (MOS_RUN, MOS_RUN_B): the notebook trains nothing itself here;
    its no-run path (training tiny arms) is test_no_run_given_trains_two_tiny_arms below."""
    # the kernel is a fresh process in tmp_path: it imports the checkout's packages via PYTHONPATH
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arms = router_inputs_run.runs / "router_inputs"
    monkeypatch.setenv("MOS_RUN", str(arms / "prompt"))
    monkeypatch.setenv("MOS_RUN_B", str(arms / "prompt_latent_timestep"))
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
    assert not (tmp_path / "router_runs").exists(), "given runs, the notebook must not train its own"
    text = "".join(out.get("text", "") + str(out.get("data", {}).get("text/plain", "")) for out in outputs)
    assert str(arms / "prompt_latent_timestep") in text  # it read the runs it was given
    assert "router/entropy" in text and "prompt_latent_timestep" in text


@pytest.mark.slow  # two fits
def test_no_run_given_trains_two_tiny_arms(tmp_path):
    """The notebook's default (MOS_RUN unset): `resolve_runs` trains the prompt and prompt_latent_timestep arms,
    and each loads back as a module that samples with routing."""
    from mos_lightning.analysis.runs import load_run, resolve_runs

    runs = resolve_runs(None, None, tmp_path / "router_runs", steps=2)
    assert list(runs) == ["prompt", "prompt_latent_timestep"]
    for arm, run in runs.items():
        assert run == tmp_path / "router_runs" / "router_inputs" / arm
        assert list(run.glob("checkpoints/*.ckpt")), f"{arm}: no checkpoint"
        module = load_run(run)
        assert module.model.fusion.router.inputs == tuple(arm.split("_"))
