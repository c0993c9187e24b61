"""Every command in entrypoints/ answers --help (the README points users there for all options)."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import entrypoints

REPO = Path(__file__).resolve().parent.parent
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(entrypoints.__path__))


def test_all_entrypoints_are_listed():
    assert {"prepare", "train", "evaluate", "serve", "load", "shadow_report"} <= set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name):
    proc = subprocess.run([sys.executable, "-m", f"entrypoints.{name}", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "usage:" in proc.stdout and "--" in proc.stdout


def test_inference_help_names_its_handler_functions_and_settings():
    """The handler module is imported by a container, not run: its --help says so and lists the
    TWOTOWER_* settings it reads."""
    proc = subprocess.run([sys.executable, "-m", "entrypoints.inference", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model_fn" in proc.stdout and "TWOTOWER_NUM_THREADS" in proc.stdout and "TWOTOWER_MAX_K" in proc.stdout

