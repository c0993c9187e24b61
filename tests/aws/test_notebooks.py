"""notebooks/00-04 executed headless, in order, against the local stack (moto, local training with 2
processes, local endpoint with a shadow variant). A few minutes on 2 cores; part of the normal run
(scripts/setup.sh installs requirements/notebooks.txt); TWOTOWER_SKIP_NOTEBOOKS=1 leaves it out."""
import json
import os
from pathlib import Path

import pytest

from tests.conftest import missing_environment
from tests.serving.conftest import documented_verdict

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
ORDER = ("00-setup", "01-train", "02-deploy", "03-shadow-test", "04-batch-and-tuning")


def test_notebooks_are_committed_without_outputs():
    try:
        import nbformat
    except ImportError:
        missing_environment("notebooks", "nbformat is not installed: pip install -r requirements/notebooks.txt")

    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        nbformat.validate(nb)
        assert all(not c.get("outputs") and c.get("execution_count") is None
                   for c in nb.cells if c.cell_type == "code"), name
        assert 'STACK = os.environ.get("TWOTOWER_STACK", "local")' in nb.cells[1].source, name


@pytest.mark.skipif(os.environ.get("TWOTOWER_SKIP_NOTEBOOKS") == "1",
                    reason="TWOTOWER_SKIP_NOTEBOOKS=1 was set")
@pytest.mark.timeout(900)
def test_notebooks_run_in_order_on_the_local_stack(tmp_path, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.setenv("TWOTOWER_STACK", "local")
    monkeypatch.setenv("TWOTOWER_WORK_DIR", str(tmp_path / "work"))
    images = {}
    for name in ORDER:
        nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        images[name] = sum("image/png" in o.get("data", {}) for c in nb.cells for o in c.get("outputs", []))
        nbformat.write(nb, tmp_path / f"{name}.executed.ipynb")
    state = json.loads((tmp_path / "work" / "state.json").read_text())
    assert {"data_dir", "production_model_dir", "endpoint_name", "production_model"} <= set(state)
    assert images["01-train"] >= 1 and images["03-shadow-test"] >= 2  # training curves; latency and agreement
    assert {"recommendations", "tuning"} <= set(state)  # notebook 04: batch recommendations, a local search
    tuning = json.loads(Path(state["tuning"]).read_text())
    assert [t["state"] for t in tuning["trials"]] == ["COMPLETE", "COMPLETE"] and tuning["best"]["command"]
    report = json.loads((tmp_path / "work" / "shadow-report" / "report.json").read_text())
    assert report["joined_requests"] >= 100 and report["verdict"] == documented_verdict(report), report["reasons"]
