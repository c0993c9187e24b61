"""Every command in entrypoints/ answers --help (the README points users there for all options)."""
import dataclasses
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

import entrypoints

REPO = Path(__file__).resolve().parent.parent
COMMANDS = sorted(m.name for m in pkgutil.iter_modules(entrypoints.__path__))


def test_all_entrypoints_are_listed():
    assert {"prepare", "train", "evaluate", "serve", "load", "shadow_report"} <= set(COMMANDS)


def _help(*argv: str) -> str:
    proc = subprocess.run([sys.executable, "-m", *argv, "--help"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def _option_lines_do_not_wrap(text: str) -> None:
    """Every line of an option list starts with an option: none continues the help of the line before."""
    in_options = False
    for line in text.splitlines():
        if line.endswith(":") and not line.startswith(" "):
            in_options = True  # a group title
        elif in_options and line.strip():
            assert re.match(r"  {0,4}-", line) or not line.startswith(" " * 6), f"wrapped help line: {line!r}"


@pytest.mark.parametrize("name", COMMANDS)
def test_help(name):
    """Every command answers --help under one program-name style, one line per option."""
    out = _help(f"entrypoints.{name}")
    assert out.startswith(f"usage: python -m entrypoints.{name}") and "--" in out
    _option_lines_do_not_wrap(out)


def test_train_help_has_a_group_per_section_and_one_line_per_option():
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import iter_fields, option_name

    out = _help("entrypoints.train")
    _option_lines_do_not_wrap(out)
    for f in dataclasses.fields(TrainConfig):
        if dataclasses.is_dataclass(f.default_factory) if f.default_factory is not dataclasses.MISSING else False:
            assert f"\n{f.metadata['title']}:\n" in out, f.name
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  --")}
    for path, f, _ in iter_fields(TrainConfig):
        flag = "--" + option_name(f).replace("_", "-")
        assert flag in lines, flag
        assert f.metadata["help"] in lines[flag] or path[0] == "prepare", flag  # prepare's shared names show above
    assert "--loss {bce,softmax,both}" in lines["--loss"] and "(default: both)" in lines["--loss"]
    assert "--train-pipeline" not in lines
    # the sections come in their declared order, each opening its own group
    titles = [f.metadata["title"] for f in dataclasses.fields(TrainConfig) if "title" in f.metadata]
    assert [out.index(f"\n{t}:\n") for t in titles] == sorted(out.index(f"\n{t}:\n") for t in titles)


def test_inference_help_names_its_handler_functions_and_settings():
    """The handler module is imported by a container, not run: its --help says so and lists the
    TWOTOWER_* settings it reads."""
    proc = subprocess.run([sys.executable, "-m", "entrypoints.inference", "--help"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "model_fn" in proc.stdout and "TWOTOWER_NUM_THREADS" in proc.stdout and "TWOTOWER_MAX_K" in proc.stdout

