"""The notebooks run top to bottom, offline, on a fixture run and DSPy's DummyLM.

Each notebook is executed with nbclient in a kernel started from *this* interpreter (the venv), via a
kernelspec written to a temporary JUPYTER_PATH, and a cell appended at the end reports the kernel's
``sys.executable``. The stored ``.ipynb`` files must carry no outputs.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

from tests.analysis_fixture import write_fixture_run  # noqa: E402
from tests.conftest import REPO, SHARED_DATA  # noqa: E402

NOTEBOOKS = REPO / "notebooks"
NOTEBOOK_NAMES = ("01_prompt_iteration.ipynb", "02_peer_review_analysis.ipynb", "03_results.ipynb")
KERNEL_NAME = "mapd-dspy-test-venv"


@pytest.fixture
def kernel_env(tmp_path, monkeypatch):
    """A kernelspec that runs this interpreter, and the notebooks' inputs as environment variables."""
    spec_dir = tmp_path / "jupyter" / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "mapd-dspy test venv", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("MAPD_NOTEBOOK_LM", "dummy")
    monkeypatch.setenv("MAPD_NOTEBOOK_EXAMPLES", "2")
    monkeypatch.setenv("MAPD_DATA_DIR", str(SHARED_DATA))
    monkeypatch.delenv("MAPD_CONFIG", raising=False)
    run_dir = write_fixture_run(tmp_path / "runs" / "toy")
    baseline_dir = write_fixture_run(tmp_path / "runs" / "none", with_report=False)
    evals = json.loads((baseline_dir / "evals.json").read_text())[:1]
    (baseline_dir / "evals.json").write_text(json.dumps([evals[0] | {"baseline": "none"}]))
    monkeypatch.setenv("MAPD_RUN_DIR", str(run_dir))
    monkeypatch.setenv("MAPD_COMPARE_RUNS", f"{baseline_dir} {run_dir}")
    return run_dir


def execute(name: str, workdir: Path):
    """Run a copy of the notebook (cwd ``workdir``) and return it with outputs; fails on any cell error."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    notebook.cells.append(nbformat.v4.new_code_cell("import sys; print('KERNEL', sys.executable)"))
    client = nbclient.NotebookClient(
        notebook, kernel_name=KERNEL_NAME, timeout=60, resources={"metadata": {"path": str(workdir)}}
    )
    client.execute()
    kernel_python = text_of(notebook.cells[-1]).split("KERNEL", 1)[1].strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve()
    return notebook


def text_of(cell) -> str:
    """All text a cell produced: streams, and text/plain of results and displays."""
    parts = []
    for output in cell.get("outputs", []):
        if output["output_type"] == "stream":
            parts.append(output["text"])
        elif "data" in output:
            data = output["data"]
            parts.append(data.get("text/markdown") or data.get("text/plain", ""))
    return "".join(parts)


def has_image(notebook) -> int:
    return sum("image/png" in o.get("data", {}) for cell in notebook.cells for o in cell.get("outputs", []))


@pytest.mark.parametrize("name", NOTEBOOK_NAMES)
def test_stored_notebooks_have_no_outputs(name):
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: stored with outputs"


def test_prompt_iteration_notebook_runs_offline_with_dummy_lm(kernel_env, tmp_path):
    if not SHARED_DATA.is_dir():
        pytest.fail(f"test data folder {SHARED_DATA} is missing")
    notebook = execute("01_prompt_iteration.ipynb", tmp_path)
    everything = "\n".join(text_of(cell) for cell in notebook.cells)
    assert "LM: dummy" in everything
    # inspect_history showed the original and then the edited instructions.
    assert "You are a teacher writing a model solution" in everything
    assert "under 80 words" in everything
    assert "accuracy before 0%, after 100%" in everything
    assert "(scripted) worked solution" in everything


def test_peer_review_notebook_shows_tables_and_plots(kernel_env, tmp_path):
    notebook = execute("02_peer_review_analysis.ipynb", tmp_path)
    everything = "\n".join(text_of(cell) for cell in notebook.cells)
    assert "Threshold sweep, rule gt" in everything and "Threshold sweep, rule ge" in everything
    assert "Inter-reviewer agreement (7 rationales" in everything
    assert "all pairs" in everything and "42.9%" in everything
    assert has_image(notebook) >= 5


def test_results_notebook_shows_accuracy_and_baselines(kernel_env, tmp_path):
    (kernel_env / "report.json").unlink()  # rebuilt by the notebook
    notebook = execute("03_results.ipynb", tmp_path)
    everything = "\n".join(text_of(cell) for cell in notebook.cells)
    assert "student-r1" in everything and "run toy (svamp)" in everything
    assert "| none | none |" in everything and "+50.0 pts" in everything
    assert (kernel_env / "report.json").exists()
    assert has_image(notebook) >= 3
