"""Fixtures for training tests: a prepared synthetic dataset and a helper to run the real CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_cli(module: str, args: List[str], timeout: int = 600,
            env: Dict[str, str] = None) -> subprocess.CompletedProcess:
    """Run `python -m <module> args` from the repository root; fail with its output on error."""
    full_env = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=REPO, env=full_env, capture_output=True,
                          text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"{module} {' '.join(args)} exited {proc.returncode}\n"
                             f"--- stdout ---\n{proc.stdout[-4000:]}\n--- stderr ---\n{proc.stderr[-6000:]}")
    return proc


def read_json(path) -> Dict:
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="session")
def prepared_synthetic(synthetic_movielens, tmp_path_factory) -> Path:
    """A prepared ml-1m-layout synthetic dataset (~30k ratings) shared by the training tests."""
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    raw = synthetic_movielens("ml-1m", 30_000, seed=1)
    out = tmp_path_factory.mktemp("prepared") / "ml-1m-30k"
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=4), str(out), log=lambda *a, **k: None)
    return out


TRAIN_ARGS = ["--max-epochs", "2", "--batch-size", "512", "--progress", "false", "--negatives", "2"]
