"""The documentation says what the code does: docs/options.md is what the commands' parsers
generate, and every command shown in README.md and docs/ is accepted by the command it names."""
from __future__ import annotations

import argparse
import importlib.util
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def _gen_options():
    spec = importlib.util.spec_from_file_location("gen_options", REPO / "scripts" / "gen_options.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_options_reference_is_current():
    gen = _gen_options()
    current = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    if gen.render() != current:
        pytest.fail("docs/options.md differs from what the commands' parsers say: "
                    "run `python scripts/gen_options.py` to update docs/options.md")


def test_argument_groups_and_subcommands_become_sections():
    gen = _gen_options()
    parser = argparse.ArgumentParser(prog="tool", description="What the tool does.")
    parser.add_argument("--top", type=int, default=3, help="a plain option (default: %(default)s)")
    group = parser.add_argument_group("model", "shape of the model")
    group.add_argument("--dim", choices=(32, 64), type=int, help="width | height")
    sub = parser.add_subparsers(dest="command")
    run = sub.add_parser("run")
    run.add_argument("--fast", action="store_true", help="go fast")
    text = "\n".join(gen._render_parser(parser, 2))
    assert "### options" in text and "### model" in text and "shape of the model" in text
    assert "| `--top TOP` | a plain option (default: 3) |" in text
    assert "| `--dim {32,64}` | width \\| height |" in text  # a '|' would split the table's cell
    assert "### `tool run`" in text and "| `--fast` | go fast |" in text


def test_a_parser_without_groups_is_one_table():
    gen = _gen_options()
    parser = argparse.ArgumentParser(prog="tool")
    parser.add_argument("path", help="where")
    parser.add_argument("--n", nargs="?", const=1, help="how many")
    text = "\n".join(gen._render_parser(parser, 2))
    assert "###" not in text and text.count("| option | description |") == 1
    assert "| `path` | where |" in text and "| `--n [N]` | how many |" in text


def _commands(text: str):
    """The commands of each shell block (continuation lines joined, comments and leading VAR=value settings cut), as
    word lists, split at ``&&``, ``;`` and pipes."""
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = "" if line.lstrip().startswith("#") else line.split(" # ", 1)[0]
            for part in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(part)
                while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=\S*", words[0]):
                    words = words[1:]
                if words:
                    yield words


def _module(words):
    return words[words.index("-m") + 1] if "-m" in words[:-1] else None


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_is_accepted(page):
    """Each `python -m entrypoints.X ...` parses with X's own parser; each `-m benchmarks.X` and
    `bash scripts/...` names a file that exists."""
    gen = _gen_options()
    commands = list(_commands(page.read_text(encoding="utf-8")))
    shown = set()
    parsers = {}
    for words in commands:
        module = _module(words)
        if words[0] == "bash" and len(words) > 1:
            assert (REPO / words[1]).is_file(), f"{page.name}: `{' '.join(words)}`: no {words[1]}"
        if module is None or module.split(".")[0] not in ("entrypoints", "benchmarks", "scripts"):
            continue
        path = REPO / (module.replace(".", "/") + ".py")
        assert path.is_file(), f"{page.name}: `{' '.join(words)}`: no module {module}"
        if not module.startswith("entrypoints."):
            continue
        name, args = module.split(".", 1)[1], words[words.index("-m") + 2:]
        shown.add(name)
        if name not in parsers:
            parsers[name] = gen.command_parser(name)
        if "-h" in args or "--help" in args:
            continue
        try:
            parsers[name].parse_args(args)
        except SystemExit:
            pytest.fail(f"{page.name}: `python -m {module} {' '.join(args)}` is refused by its parser")
    if page.name == "README.md":
        assert {"prepare", "train", "evaluate", "serve", "load", "shadow_report"} <= shown
