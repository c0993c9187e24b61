"""Config dataclasses <-> command lines, flat dicts and SageMaker hyperparameters.

`add_arguments` / `from_namespace` turn a dataclass into argparse options (field ``foo_bar``
becomes ``--foo-bar``) so a default is never written twice; a nested section becomes an argument
group, and options stay flat (``--batch-size``, ``batch_size``) whatever section holds the value.
Options that no longer exist are declared on their config class (``RETIRED``) as `Retired` entries.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple, Type, TypeVar

T = TypeVar("T")


def opt(default: Any, help: str, choices: Optional[tuple] = None, *, doc: Optional[str] = None,
         option: Optional[str] = None, **kw: Any) -> Any:
    """A config field: `help` is the one-line text of ``--help``; `doc`, the longer explanation for the
    options reference (reachable from the parser as the action's ``doc`` attribute); `option`, the
    option / flat key name when it differs from the attribute name."""
    meta: Dict[str, Any] = {"help": help}
    if choices:
        meta["choices"] = choices
    if doc:
        meta["doc"] = doc
    if option:
        meta["option"] = option
    if isinstance(default, list):
        return field(default_factory=lambda d=default: list(d), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def section(cls: Type[Any], title: str) -> Any:
    """A nested config section; `title` is its one-line ``--help`` group title."""
    return field(default_factory=cls, metadata={"title": title})


def parse_bool(value: Any) -> bool:
    """Lenient boolean: true/false, 1/0, yes/no, on/off (SageMaker SDKs encode booleans differently)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "t", "yes", "y", "on"):
        return True
    if text in ("0", "false", "f", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false), got {value!r}")


def _int_list(value: Any) -> List[int]:
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value]
    try:
        return [int(v) for v in str(value).replace("[", "").replace("]", "").replace(",", " ").split()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected integers like '128,64', got {value!r}") from e


def _optional(tp: Any) -> Any:
    args = typing.get_args(tp)
    if typing.get_origin(tp) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None))
    return tp


def option_name(f: dataclasses.Field) -> str:
    """The option / flat key of a leaf field: its ``option`` metadata, else its attribute name."""
    return f.metadata.get("option", f.name)


def iter_fields(cls: Type[Any]):
    """Leaf fields of a (nested) config dataclass: yields (path, field, type); `path` holds attribute
    names (the last one is the option name only where `option_name` says so)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = _optional(hints[f.name])
        if dataclasses.is_dataclass(tp):
            for path, sub, stp in iter_fields(tp):
                yield (f.name,) + path, sub, stp
        else:
            yield (f.name,), f, tp


def option_names(cls: Type[Any]) -> set:
    """Every option / flat key name of a config class."""
    return {option_name(f) for _, f, _ in iter_fields(cls)}


@dataclass(frozen=True)
class Retired:
    """An option that no longer exists. Renamed (`renamed_to`): its value goes to the new option.
    Removed: a value in `ignored` (what the option did by default) is accepted and dropped, any
    other is refused. Either way `message` says what happened to it."""

    option: str
    message: str
    renamed_to: Optional[str] = None
    ignored: Tuple[str, ...] = ()


_METAVARS = {int: "N", float: "X", str: "TEXT"}  # short, so an option and its help share one line


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def retired_option(cls: Type[Any], name: str, value: Any) -> Optional[Tuple[str, Any]]:
    """For a retired option of `cls`: ``None`` once a one-line notice went to stderr (a removed option
    given its old default), ``(new_name, value)`` for a renamed one; raises ValueError for a removed
    option given a value that did something. Returns ``(name, value)`` unchanged for other options."""
    retired = next((r for r in getattr(cls, "RETIRED", ()) if r.option == name), None)
    if retired is None:
        return name, value
    if retired.renamed_to:
        print(f"warning: {_flag(name)} is now {_flag(retired.renamed_to)}: {retired.message}", file=sys.stderr)
        return retired.renamed_to, value
    if str(value).strip().lower() in retired.ignored:
        print(f"warning: {_flag(name)} is gone and does nothing: {retired.message}", file=sys.stderr)
        return None
    raise ValueError(f"{_flag(name)} {value}: this option is gone: {retired.message}")


class _RetiredAction(argparse.Action):
    def __init__(self, option_strings: List[str], dest: str, cls: Type[Any] = object, **kw: Any) -> None:
        self.cls = cls
        super().__init__(option_strings, dest, **kw)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: Optional[str] = None) -> None:
        try:
            moved = retired_option(self.cls, self.dest, values)
        except ValueError as e:
            parser.error(str(e))
        if moved is not None:
            setattr(namespace, moved[0], moved[1])


class OneLineHelpFormatter(argparse.RawDescriptionHelpFormatter):
    """``--help`` with one line per option: the help text follows the option on its line and is
    never wrapped (a long option pushes its help right instead of onto the next line)."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 34,
                 width: Optional[int] = None) -> None:
        super().__init__(prog, indent_increment, max_help_position, width)

    def add_usage(self, usage: Optional[str], actions: Any, groups: Any, prefix: Optional[str] = None) -> None:
        if usage is None and actions and all(a.option_strings for a in actions):  # the option list follows
            usage = "%(prog)s [options]"
        super().add_usage(usage, actions, groups, prefix)

    def _format_action(self, action: argparse.Action) -> str:
        if action.nargs == argparse.PARSER:  # sub-commands: argparse's own layout
            return super()._format_action(action)
        header = self._format_action_invocation(action)
        text = " ".join(self._expand_help(action).split()) if action.help else ""
        if not text:
            return " " * self._current_indent + header + "\n"
        column = min(self._action_max_length + 2, self._max_help_position)
        pad = max(column - self._current_indent - len(header), 2)
        return " " * self._current_indent + header + " " * pad + text + "\n"


def add_arguments(parser: argparse.ArgumentParser, cls: Type[Any], only: Optional[set] = None) -> None:
    """Add one `--option` per leaf name of `cls`; a nested section becomes an argument group titled
    by its ``title`` (a name that occurs at several depths, like `seed`, is one option that sets all
    of them, shown where it first occurs). Each action carries its field's long explanation as
    ``action.doc`` (None where the one-line help says it all). Retired options of `cls` are
    accepted (hidden from --help) and handled by `retired_option`."""
    seen = set()
    groups: Dict[str, Any] = {}
    hints = {f.name: f for f in dataclasses.fields(cls)}
    for path, f, tp in iter_fields(cls):
        name = option_name(f)
        if (only is not None and name not in only) or name in seen:
            continue
        seen.add(name)
        target: Any = parser
        if len(path) > 1:
            title = hints[path[0]].metadata.get("title", path[0])
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            target = groups[title]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        text = f.metadata.get("help", "") + ("" if default is None else f" (default: {default})")
        kw: Dict[str, Any] = dict(dest=name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        choices = f.metadata.get("choices")
        if choices:
            kw["choices"] = choices
            if len(",".join(choices)) > 40:  # a long list would push the help off the line: --help says TEXT,
                kw["metavar"] = "TEXT"       # an invalid value's error lists them
        if tp is bool:
            kw.update(type=parse_bool, nargs="?", const=True, metavar="BOOL")
        elif typing.get_origin(tp) in (list, List):
            kw.update(type=_int_list, metavar="N,N")
        else:
            kw["type"] = tp
            kw.setdefault("metavar", None if choices else _METAVARS.get(tp, "VALUE"))
        action = target.add_argument(_flag(name), **kw)
        action.doc = f.metadata.get("doc")
    for retired in getattr(cls, "RETIRED", ()):
        if only is None or retired.option in only:
            parser.add_argument(_flag(retired.option), dest=retired.option, action=_RetiredAction, cls=cls,
                                default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def from_dict(cls: Type[T], values: Dict[str, Any]) -> T:
    """Build `cls` from flat `{option_name: value}` (unknown names raise, naming them; retired
    names go through `retired_option`)."""
    leaves: Dict[str, list] = {}
    for path, f, tp in iter_fields(cls):
        leaves.setdefault(option_name(f), []).append((path, tp))
    given: Dict[str, Any] = {}
    for name, value in values.items():
        moved = retired_option(cls, name, value)
        if moved is not None:
            given[moved[0]] = moved[1]
    unknown = sorted(set(given) - set(leaves))
    if unknown:
        raise ValueError(f"unknown option(s) for {cls.__name__}: {', '.join(unknown)}")
    cfg = cls()
    for name, value in given.items():
        for path, tp in leaves[name]:
            if value is not None:
                if tp is bool:
                    value = parse_bool(value)
                elif typing.get_origin(tp) in (list, List):
                    value = _int_list(value)
                elif tp in (int, float, str):
                    value = tp(value)
            target = cfg
            for p in path[:-1]:
                target = getattr(target, p)
            setattr(target, path[-1], value)
    return cfg


def replace_options(cfg: T, **changes: Any) -> T:
    """A copy of `cfg` with options changed by their flat names (every leaf of a name, as `from_dict`
    sets them), for code that speaks in option names rather than sections."""
    unknown = sorted(set(changes) - option_names(type(cfg)))
    if unknown:
        raise ValueError(f"unknown option(s) for {type(cfg).__name__}: {', '.join(unknown)}")
    out = copy.deepcopy(cfg)
    for path, f, _ in iter_fields(type(cfg)):
        if option_name(f) in changes:
            target = out
            for p in path[:-1]:
                target = getattr(target, p)
            setattr(target, path[-1], changes[option_name(f)])
    return out


def from_namespace(cls: Type[T], ns: argparse.Namespace) -> T:
    return from_dict(cls, vars(ns))


def to_flat_dict(cfg: Any) -> Dict[str, Any]:
    """`{option_name: value}` of a config (for MLflow params and SageMaker hyperparameters)."""
    out: Dict[str, Any] = {}
    for path, f, _ in iter_fields(type(cfg)):
        name = option_name(f)
        if name in out:
            continue
        value = cfg
        for p in path:
            value = getattr(value, p)
        out[name] = value
    return out
