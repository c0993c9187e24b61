"""A test whose environment is absent (here: the real MovieLens sets, pointed at an empty folder) is
named in the run's normal output, and fails instead of skipping when TWOTOWER_REQUIRED_ENVIRONMENTS
asks for that environment (CI sets it to all)."""
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_real_movielens_tests(tmp_path, required: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, TWOTOWER_REAL_MOVIELENS=str(tmp_path), TWOTOWER_REQUIRED_ENVIRONMENTS=required)
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                           "tests/data/test_real_movielens.py"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)


def test_a_missing_environment_is_named_in_the_summary_and_fails_where_required(tmp_path):
    skipped = run_real_movielens_tests(tmp_path, "")
    assert skipped.returncode == 0, skipped.stdout[-2000:]
    assert "tests not run: environments missing" in skipped.stdout  # without -ra
    assert f"test_ml100k: missing test environment (movielens): real ml-100k not present at {tmp_path}" \
        in skipped.stdout
    assert "2 test(s) did not run" in skipped.stdout and "2 skipped" in skipped.stdout
    failed = run_real_movielens_tests(tmp_path, "all")
    assert failed.returncode == 1 and "2 failed" in failed.stdout, failed.stdout[-2000:]
    assert "TWOTOWER_REQUIRED_ENVIRONMENTS requires it" in failed.stdout
    other = run_real_movielens_tests(tmp_path, "sdk,notebooks")  # other kinds required: still a skip
    assert other.returncode == 0 and "2 skipped" in other.stdout
