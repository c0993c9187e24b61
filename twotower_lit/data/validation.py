"""Malformed input: one exception type that names file, line and field, and the skip counters.

``--on-bad-lines error`` raises `DataValidationError` at the first bad line of a file;
``--on-bad-lines skip`` drops the line and counts it in a `BadLineReport` under
``"<file kind>.<reason>"`` (e.g. ``"ratings.bad_rating"``), which ends up in the manifest.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

# reasons a line is rejected (the suffix of a skip counter)
WRONG_FIELD_COUNT = "wrong_field_count"
UNDECODABLE = "undecodable"
BAD_USER_ID = "bad_user_id"
BAD_ITEM_ID = "bad_item_id"
BAD_RATING = "bad_rating"
BAD_TIMESTAMP = "bad_timestamp"
BAD_VALUE = "bad_value"  # side files: a field that is present but unusable (age, gender, flags)
BAD_HEADER = "bad_header"

SKIP_HINT = "fix or delete the line, or pass --on-bad-lines skip to skip and count such lines"


class DataValidationError(ValueError):
    """A malformed input line: ``file:line: field 'x': problem (hint)``."""

    def __init__(self, file: str, line: int, problem: str, field: Optional[str] = None,
                 reason: Optional[str] = None, hint: str = SKIP_HINT):
        self.file, self.line, self.field = file, line, field
        self.problem, self.reason, self.hint = problem, reason, hint
        where = f"{file}:{line}: " if line else f"{file}: "
        what = f"field '{field}': {problem}" if field else problem
        super().__init__(f"{where}{what} ({hint})")


@dataclass
class BadLineReport:
    """Counts of skipped lines per ``kind.reason``, plus the first few locations for the summary."""

    counts: Counter = field(default_factory=Counter)
    examples: List[str] = field(default_factory=list)
    max_examples: int = 5

    def add(self, kind: str, reason: str, n: int = 1, where: Optional[Tuple[str, int, str]] = None) -> None:
        if n <= 0:
            return
        self.counts[f"{kind}.{reason}"] += n
        if where is not None and len(self.examples) < self.max_examples:
            file, line, problem = where
            self.examples.append(f"{file}:{line}: {problem}")

    def as_dict(self) -> Dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}

    @property
    def total(self) -> int:
        return int(sum(self.counts.values()))


def check_mode(on_bad_lines: str) -> None:
    if on_bad_lines not in ("error", "skip"):
        raise ValueError(f"on_bad_lines must be 'error' or 'skip', got {on_bad_lines!r}")
