"""The SageMaker SDK tests in the two SDK environments (v2 and v3 cannot share one environment;
scripts/setup.sh builds .venv-sagemaker-v2 and .venv-sagemaker-v3 beside .venv)."""
import subprocess
from pathlib import Path

import pytest

from tests.conftest import missing_environment

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("major", ["v2", "v3"])
@pytest.mark.timeout(600)
def test_training_job_launch_with_sdk(major):
    python = REPO / f".venv-sagemaker-{major}" / "bin" / "python"
    if not python.exists():
        missing_environment("sdk", f"{python.parent.parent} is absent: run `bash scripts/setup.sh` (it builds the "
                                   "SDK environments)")
    proc = subprocess.run([str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/aws/test_training_job_sdk.py", "tests/aws/test_tuning_job_sdk.py"], cwd=REPO,
                          capture_output=True, text=True, timeout=580)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout.splitlines()[-1], proc.stdout[-1000:]
