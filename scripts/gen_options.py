"""Write docs/options.md, the options reference, from the commands' own argparse parsers.

    python scripts/gen_options.py           # rewrite docs/options.md
    python scripts/gen_options.py --check   # exit 1 if docs/options.md is not what the parsers say

Each command's parser is taken from the command itself: its ``main`` is called with no arguments
and stopped at its first ``parse_args``, so the reference lists whatever the command accepts
(argument groups become sections, sub-commands get their own). Nothing here restates an option.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import textwrap
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
OUTPUT = REPO / "docs" / "options.md"
COMMAND = "python scripts/gen_options.py"
# the reference's order; any other command in entrypoints/ follows, alphabetically
ORDER = ("prepare", "train", "evaluate", "recommend", "index", "serve", "inference", "load", "shadow_report", "tune",
         "sagemaker_train", "sagemaker_tune", "sagemaker_deploy", "sagemaker_batch", "sagemaker_shadow",
         "sagemaker_mlflow", "sagemaker_cleanup")


def command_names() -> List[str]:
    """Every command in entrypoints/ (a module with a ``main``), in the reference's order."""
    found = sorted(p.stem for p in (REPO / "entrypoints").glob("*.py")
                   if p.stem != "__init__" and callable(getattr(importlib.import_module(f"entrypoints.{p.stem}"),
                                                                "main", None)))
    return [n for n in ORDER if n in found] + [n for n in found if n not in ORDER]


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        super().__init__(parser.prog)
        self.parser = parser


@contextlib.contextmanager
def _stop_at_parse() -> Iterator[None]:
    saved = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
    try:
        yield
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = saved


def command_parser(name: str) -> argparse.ArgumentParser:
    """The parser ``python -m entrypoints.<name>`` builds, with that program name."""
    module = importlib.import_module(f"entrypoints.{name}")
    with _stop_at_parse():
        try:
            module.main([])
        except _Captured as captured:
            parser = captured.parser
        else:
            raise RuntimeError(f"entrypoints.{name}.main([]) returned without parsing arguments")
    _rename(parser, f"python -m entrypoints.{name}")
    return parser


def _rename(parser: argparse.ArgumentParser, prog: str) -> None:
    parser.prog = prog
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                _rename(sub, f"{prog} {sub_name}")


def _invocation(action: argparse.Action) -> str:
    if action.metavar is not None:
        metavar = action.metavar if isinstance(action.metavar, str) else " ".join(action.metavar)
    elif action.choices is not None and not isinstance(action, argparse._SubParsersAction):
        metavar = "{" + ",".join(str(c) for c in action.choices) + "}"
    elif isinstance(action, argparse._SubParsersAction):
        metavar = "{" + ",".join(action.choices) + "}"
    else:
        metavar = action.dest.upper() if action.option_strings else action.dest
    if not action.option_strings:
        return metavar
    nargs = action.nargs
    if nargs == 0:
        arg = ""
    elif nargs == "?":
        arg = f" [{metavar}]"
    elif nargs == "*":
        arg = f" [{metavar} ...]"
    elif nargs == "+":
        arg = f" {metavar} [{metavar} ...]"
    elif isinstance(nargs, int):
        arg = " " + " ".join([metavar] * nargs)
    else:
        arg = f" {metavar}"
    return ", ".join(action.option_strings) + arg


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The help text as ``--help`` prints it (the formatter's additions and %-expansions), on one line."""
    formatter = parser._get_formatter()
    text = formatter._get_help_string(action) or ""
    params = {k: v for k, v in dict(vars(action), prog=parser.prog).items() if v is not argparse.SUPPRESS}
    if params.get("choices") is not None:
        params["choices"] = ", ".join(str(c) for c in params["choices"])
    text = text % params
    return " ".join(text.split()).replace("|", "\\|")


def _groups(parser: argparse.ArgumentParser) -> List[Tuple[Optional[str], Optional[str], List[argparse.Action]]]:
    """(title, description, actions) of each non-empty group; the title is None when the parser
    has only argparse's own two groups (one table, no sub-headings)."""
    groups = [(g.title, g.description, [a for a in g._group_actions if a.help is not argparse.SUPPRESS])
              for g in parser._action_groups]
    groups = [g for g in groups if g[2]]
    if all(g is parser._positionals or g is parser._optionals for g in parser._action_groups):
        return [(None, None, [a for g in groups for a in g[2]])]
    return groups


def _render_parser(parser: argparse.ArgumentParser, level: int) -> List[str]:
    lines: List[str] = []
    if parser.description:
        lines += [textwrap.dedent(parser.description).strip(), ""]
    subcommands = []
    for title, description, actions in _groups(parser):
        if title is not None:
            lines += [f"{'#' * (level + 1)} {title}", ""]
        if description:
            lines += [" ".join(description.split()), ""]
        lines += ["| option | description |", "|---|---|"]
        for action in actions:
            lines.append(f"| `{_invocation(action).replace('|', chr(92) + '|')}` | {_help(parser, action)} |")
            if isinstance(action, argparse._SubParsersAction):
                subcommands += list(action.choices.items())
        lines.append("")
    if parser.epilog:
        lines += ["```text", textwrap.dedent(parser.epilog).strip(), "```", ""]
    for _, sub in subcommands:
        lines += [f"{'#' * (level + 1)} `{sub.prog}`", ""]
        lines += _render_parser(sub, level + 1)
    return lines


def render() -> str:
    lines = ["# Options reference", "",
             f"Generated from the commands' own parsers by `{COMMAND}`; do not edit by hand (a test",
             "compares). Every command also prints its options with `--help`.", ""]
    parsers = {name: command_parser(name) for name in command_names()}
    for name, parser in parsers.items():
        summary = " ".join((parser.description or "").strip().split("\n\n")[0].split())
        lines.append(f"- [`{name}`](#{name}): {summary}")
    lines.append("")
    for name, parser in parsers.items():
        lines += [f'<a id="{name}"></a>', "", f"## `{parser.prog}`", ""]
        lines += _render_parser(parser, 2)
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog=COMMAND, description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with docs/options.md instead of writing it")
    args = ap.parse_args(argv)
    os.environ.setdefault("COLUMNS", "100")  # argparse reads the width: the same text on every terminal
    text = render()
    if args.check:
        current = OUTPUT.read_text(encoding="utf-8") if OUTPUT.exists() else ""
        if current != text:
            print(f"docs/options.md is out of date: run `{COMMAND}` to update docs/options.md", file=sys.stderr)
            return 1
        print("docs/options.md is up to date")
        return 0
    OUTPUT.parent.mkdir(exist_ok=True)
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
