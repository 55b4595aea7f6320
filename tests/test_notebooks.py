"""Executes every research notebook (notebooks/*.ipynb) top to bottom; any error fails.

Each notebook runs in a temporary copy with ``QLORA_JAX_NOTEBOOK_SMALL=1``, which the notebooks
read to run a reduced version of their study (fewer texts, steps and runs) within CI's time; the
outputs committed in the repository come from their full runs. Kernel: ``python3`` (ipykernel,
in the test extra).
"""

import os
import pathlib
import shutil

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = sorted((pathlib.Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def test_the_four_notebooks_exist():
    names = [p.name for p in NOTEBOOKS]
    for prefix in ("01_", "02_", "03_", "04_"):
        assert any(n.startswith(prefix) for n in names), f"no notebook {prefix}*.ipynb in {names}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    committed = nbformat.read(path, as_version=4)
    # The committed notebook shows its results: every code cell was executed and kept its output.
    code = [c for c in committed.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{path.name} has unexecuted cells"
    assert any(o.get("output_type") == "display_data" for c in code for o in c.outputs), \
        f"{path.name} has no plot in its committed outputs"
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    monkeypatch.setenv("QLORA_JAX_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("QLORA_JAX_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(copy, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    try:
        client.execute()
    except nbclient.exceptions.CellExecutionError as e:
        pytest.fail(f"{path.name} failed in CI mode (QLORA_JAX_NOTEBOOK_SMALL=1):\n{e}")
    errors = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs
              if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
