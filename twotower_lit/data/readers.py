"""Readers for the GroupLens files: validated numpy arrays (ratings) and dicts (users, movies).

Ratings can be 32M lines, so they are parsed by Arrow and checked with numpy; a line-by-line
Python pass would take minutes. Two paths:

* fast: ``pyarrow.csv`` with strict column types (``::`` files are read with delimiter ``:`` and
  the empty in-between columns are checked to be empty). Most files are clean and end here.
* robust, when Arrow refuses the file: the file is cut into blocks of whole lines, each block
  split into lines and fields by Arrow kernels, each field checked by a regular expression, so
  every line keeps its 1-based number and a reason. Still vectorised, just ~4x slower.

Both paths then run the same value checks (ids >= 1, rating on the set's star scale, sane
timestamp). Side files (users, movies: at most ~90k lines) are read line by line in Python,
which keeps exact line numbers and handles quoted CSV titles.
"""
from __future__ import annotations

import csv
import os
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv

from twotower_lit.data import features as F
from twotower_lit.data.layouts import MOVIES_CSV_HEADER, Layout
from twotower_lit.data.validation import (BAD_HEADER, BAD_ITEM_ID, BAD_RATING, BAD_TIMESTAMP, BAD_USER_ID,
                                          BAD_VALUE, UNDECODABLE, WRONG_FIELD_COUNT, BadLineReport,
                                          DataValidationError, check_mode)

RATING_FIELDS = ("userId", "movieId", "rating", "timestamp")
# Unix seconds up to 2100-01-01: anything later (or negative) is a corrupted value, not a rating time.
MAX_TIMESTAMP = 4_102_444_800

_INT_RE = r"^\s*-?[0-9]{1,18}\s*$"  # 18 digits: never overflows int64 when cast
_FLOAT_RE = r"^\s*[+-]?([0-9]{1,18}\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]{1,3})?\s*$"
_FIELD_RULES = (  # (field, regex, reason) in file order; the first failing field names the line
    ("userId", _INT_RE, BAD_USER_ID),
    ("movieId", _INT_RE, BAD_ITEM_ID),
    ("rating", _FLOAT_RE, BAD_RATING),
    ("timestamp", _INT_RE, BAD_TIMESTAMP),
)
_REASONS = (None, WRONG_FIELD_COUNT, UNDECODABLE, BAD_USER_ID, BAD_ITEM_ID, BAD_RATING, BAD_TIMESTAMP)
_CODE = {r: i for i, r in enumerate(_REASONS)}
_BLOCK_BYTES = 1 << 25


@dataclass
class Ratings:
    """Valid rating rows in file order (the order breaks timestamp ties between duplicates)."""

    user_id: np.ndarray    # int64 raw GroupLens ids
    item_id: np.ndarray    # int64
    rating: np.ndarray     # float32
    timestamp: np.ndarray  # int64 Unix seconds
    lines_read: int        # data lines in the file (header excluded), valid or not

    def __len__(self) -> int:
        return int(self.user_id.shape[0])


# ---------------------------------------------------------------------------------------------
# ratings


def read_ratings(data_dir: str, layout: Layout, on_bad_lines: str, report: BadLineReport) -> Ratings:
    """Parse and validate the ratings file of ``layout`` in ``data_dir``."""
    check_mode(on_bad_lines)
    path = os.path.join(data_dir, layout.ratings_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: ratings file missing (is --dataset {layout.name} right for {data_dir}?)")
    first_line = 1
    if layout.header:
        _check_header(path, layout.header, "utf-8")
        first_line = 2
    cols = _parse_fast(path, layout, first_line)
    if cols is not None:
        lines = None
        struct_bad = np.zeros(0, np.int64), np.zeros(0, np.int8)
        examples: Dict[int, bytes] = {}
        lines_read = len(cols[0])
    else:
        cols, lines, struct_bad, examples, lines_read = _parse_robust(path, layout, first_line,
                                                                      stop_at_bad=on_bad_lines == "error")

    user, item, rating, ts = cols
    code = _value_codes(user, item, rating, ts, layout)
    value_bad = np.flatnonzero(code)
    value_lines = (value_bad + first_line) if lines is None else lines[value_bad]

    bad_lines = np.concatenate([struct_bad[0], value_lines])
    if bad_lines.size:
        bad_codes = np.concatenate([struct_bad[1], code[value_bad]])
        first = int(np.argmin(bad_lines))
        line = int(bad_lines[first])
        if first < struct_bad[0].size:
            reason, field, problem = _describe_line(examples[line], layout)
        else:
            row = int(value_bad[first - struct_bad[0].size])
            reason, field, problem = _describe_value(_REASONS[bad_codes[first]], row, cols, layout)
        if on_bad_lines == "error":
            raise DataValidationError(path, line, problem, field=field, reason=reason)
        for c in np.unique(bad_codes):
            report.add("ratings", _REASONS[c], int((bad_codes == c).sum()))
        first_bad = f"{path}:{line}: {field + ': ' if field else ''}{problem}"
        report.examples.append(first_bad)
        keep = code == 0
        user, item, rating, ts = user[keep], item[keep], rating[keep], ts[keep]
    if lines_read == 0:
        raise DataValidationError(path, 0, "holds no rating lines" + (" after its header" if layout.header else ""),
                                  hint="pass the complete ratings file of a GroupLens set; was it truncated "
                                       "while copying?")
    if user.size == 0:
        skipped = ", ".join(f"{k.split('.', 1)[1]} {v:,}" for k, v in report.as_dict().items()
                            if k.startswith("ratings."))
        raise DataValidationError(path, 0, f"every one of its {lines_read:,} rating lines is malformed and was "
                                  f"skipped ({skipped}); the first: {first_bad}",
                                  hint=f"check that the file is {layout.name}'s {layout.ratings_file} "
                                       "(or pass the right --dataset)")
    return Ratings(user.astype(np.int64, copy=False), item.astype(np.int64, copy=False),
                   rating.astype(np.float32), ts.astype(np.int64, copy=False), lines_read)


def _check_header(path: str, expected: Tuple[str, ...], encoding: str) -> None:
    with open(path, "rb") as f:
        raw = f.readline()
    text = raw.decode(encoding, errors="replace").lstrip("\ufeff").rstrip("\r\n")
    found = tuple(p.strip().strip('"') for p in text.split(","))
    if found != expected:
        raise DataValidationError(path, 1, f"expected the header {','.join(expected)!r}, found {text[:80]!r}",
                                  reason=BAD_HEADER,
                                  hint="check that the file is a GroupLens CSV, or pass the right --dataset")


def _parse_fast(source, layout: Layout, first_line: int) -> Optional[Tuple[np.ndarray, ...]]:
    """Typed Arrow parse of a path or a bytes block; None when Arrow finds anything it cannot
    convert (-> robust path)."""
    empty = os.path.getsize(source) == 0 if isinstance(source, str) else len(source) == 0
    if empty:
        return tuple(np.zeros(0, t) for t in (np.int64, np.int64, np.float64, np.int64))
    if not isinstance(source, str):
        source = pa.BufferReader(source)
    types = {"userId": pa.int64(), "movieId": pa.int64(), "rating": pa.float64(), "timestamp": pa.int64()}
    if layout.delimiter == "::":
        # ':' as the delimiter turns 'a::b' into 'a', '', 'b': the empty columns must stay empty.
        names = ["userId", "_e1", "movieId", "_e2", "rating", "_e3", "timestamp"]
        delimiter = ":"
        types.update({n: pa.binary() for n in ("_e1", "_e2", "_e3")})
    else:
        names, delimiter = list(RATING_FIELDS), layout.delimiter
    try:
        table = pcsv.read_csv(
            source,
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=first_line - 1, block_size=1 << 24),
            # ignore_empty_lines=False keeps row r on line r + first_line (an empty line fails here)
            parse_options=pcsv.ParseOptions(delimiter=delimiter, quote_char=False, ignore_empty_lines=False),
            convert_options=pcsv.ConvertOptions(column_types=types, null_values=[], strings_can_be_null=False,
                                                quoted_strings_can_be_null=False),
        )
    except pa.ArrowInvalid:
        return None
    for name in names:
        if name.startswith("_e") and table.num_rows and pc.max(pc.binary_length(table[name])).as_py() > 0:
            return None
    return tuple(table[n].to_numpy() for n in RATING_FIELDS)


def _line_blocks(path: str, first_line: int) -> Iterator[Tuple[bytes, int]]:
    """(block of whole lines, number of its first line); blocks keep memory flat on big files."""
    with open(path, "rb") as f:
        for _ in range(first_line - 1):
            f.readline()
        line_no, rest = first_line, b""
        while True:
            block = f.read(_BLOCK_BYTES)
            if not block:
                if rest:
                    yield rest, line_no
                return
            block = rest + block
            cut = block.rfind(b"\n")
            if cut < 0:
                rest = block
                continue
            yield block[: cut + 1], line_no
            line_no += block.count(b"\n", 0, cut + 1)
            rest = block[cut + 1:]


def _parse_robust(path: str, layout: Layout, first_line: int, stop_at_bad: bool = False):
    """Line-numbered vectorised parse; returns typed columns of the structurally valid lines,
    their line numbers, (bad line numbers, reason codes), {bad line: its bytes} (first few).

    Each block first gets the fast typed parse; only blocks that fail it are split into lines and
    fields here, so a 32M-line file with one bad line costs about one extra fast parse. With
    ``stop_at_bad`` (error mode) reading stops after the first block with a bad line: every
    earlier line has been parsed, so the first bad line of the file is among those seen."""
    cols: List[List[np.ndarray]] = [[], [], [], []]
    line_parts, bad_lines, bad_codes = [], [], []
    examples: Dict[int, bytes] = {}
    total = 0
    for block, base in _line_blocks(path, first_line):
        typed = _parse_fast(block, layout, 1)
        if typed is not None:
            for out, col in zip(cols, typed):
                out.append(col)
            line_parts.append(base + np.arange(len(typed[0]), dtype=np.int64))
            total += len(typed[0])
            continue
        data = block[:-1] if block.endswith(b"\n") else block
        lines = pc.list_flatten(pc.split_pattern(pa.array([data], pa.large_binary()), "\n"))
        if b"\r" in data:
            lines = pc.replace_substring_regex(lines, "\r$", "")
        n = len(lines)
        total += n
        numbers = base + np.arange(n, dtype=np.int64)
        code = np.zeros(n, np.int8)

        fields = pc.split_pattern(lines, pattern=layout.delimiter)
        code[pc.list_value_length(fields).to_numpy() != len(RATING_FIELDS)] = _CODE[WRONG_FIELD_COUNT]
        ok = np.flatnonzero(code == 0)
        good = fields.take(pa.array(ok))
        texts = []
        for j, (_, regex, reason) in enumerate(_FIELD_RULES):
            col = pc.list_element(good, j)
            texts.append(col)
            fails = ~pc.match_substring_regex(col, regex).to_numpy(zero_copy_only=False)
            rows = ok[fails]
            code[rows[code[rows] == 0]] = _CODE[reason]

        # Ratings are ASCII; a line with a byte >= 0x80 that is not UTF-8 is 'undecodable'.
        raw = np.frombuffer(data, np.uint8)
        high = np.flatnonzero(raw >= 0x80)
        if high.size:
            newlines = np.flatnonzero(raw == 10)
            for idx in np.unique(np.searchsorted(newlines, high)):
                try:
                    lines[int(idx)].as_py().decode("utf-8")
                except UnicodeDecodeError:
                    code[idx] = _CODE[UNDECODABLE]

        bad = np.flatnonzero(code)
        if bad.size:
            bad_lines.append(numbers[bad])
            bad_codes.append(code[bad])
            if len(examples) < 5:
                for idx in bad[: 5 - len(examples)]:
                    examples[int(numbers[idx])] = lines[int(idx)].as_py()
        keep = code[ok] == 0
        for j, (typ, out) in enumerate(zip((pa.int64(), pa.int64(), pa.float64(), pa.int64()), cols)):
            col = texts[j].filter(pa.array(keep)).cast(pa.large_string())
            out.append(pc.utf8_trim_whitespace(col).cast(typ).to_numpy())
        line_parts.append(numbers[ok[keep]])
        if stop_at_bad and bad.size:
            break

    def cat(parts, dtype):
        return np.concatenate(parts) if parts else np.zeros(0, dtype)

    typed = tuple(cat(c, t) for c, t in zip(cols, (np.int64, np.int64, np.float64, np.int64)))
    return (typed, cat(line_parts, np.int64), (cat(bad_lines, np.int64), cat(bad_codes, np.int8)),
            examples, total)


def _value_codes(user, item, rating, ts, layout: Layout) -> np.ndarray:
    """Reason code per row for values that parse but make no sense (0 = fine)."""
    code = np.zeros(user.shape[0], np.int8)
    lo, hi = layout.rating_range
    steps = rating / layout.rating_step
    bad_rating = ~np.isfinite(rating) | (rating < lo) | (rating > hi) | (steps != np.round(steps))
    for mask, reason in ((ts < 0) | (ts > MAX_TIMESTAMP), BAD_TIMESTAMP), (bad_rating, BAD_RATING), \
                        (item < 1, BAD_ITEM_ID), (user < 1, BAD_USER_ID):
        code[mask] = _CODE[reason]  # later assignments win: the first field in file order names the row
    return code


def _scale(layout: Layout) -> str:
    lo, hi = layout.rating_range
    return "whole stars 1..5" if layout.rating_step == 1.0 else f"half stars {lo:g}..{hi:g}"


def _describe_value(reason: str, row: int, cols, layout: Layout) -> Tuple[str, str, str]:
    user, item, rating, ts = cols
    if reason == BAD_USER_ID:
        return reason, "userId", f"{int(user[row])} is not a positive integer id"
    if reason == BAD_ITEM_ID:
        return reason, "movieId", f"{int(item[row])} is not a positive integer id"
    if reason == BAD_RATING:
        return reason, "rating", f"{float(rating[row]):g} is not a rating on this set's scale ({_scale(layout)})"
    return reason, "timestamp", f"{int(ts[row])} is not Unix seconds between 0 and {MAX_TIMESTAMP} (2100-01-01)"


def _describe_line(raw: bytes, layout: Layout) -> Tuple[str, Optional[str], str]:
    """Why one ratings line was rejected, in words (used for the error and the examples)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return UNDECODABLE, None, f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid UTF-8 text"
    parts = text.split(layout.delimiter)
    if len(parts) != len(RATING_FIELDS):
        shown = text if len(text) <= 80 else text[:77] + "..."
        return (WRONG_FIELD_COUNT, None, f"expected {len(RATING_FIELDS)} fields separated by {layout.delimiter!r}, "
                f"found {len(parts)} in {shown!r}")
    for value, (name, regex, reason) in zip(parts, _FIELD_RULES):
        if not re.match(regex, value):
            kind = "a number" if name == "rating" else "an integer"
            return reason, name, f"{value[:40]!r} is not {kind}"
    return WRONG_FIELD_COUNT, None, f"malformed line {text[:80]!r}"


# ---------------------------------------------------------------------------------------------
# side files (users, movies): small, read in Python with exact line numbers


class _SideFile:
    """Helper that raises or counts a bad side-file line, with the file and line number."""

    def __init__(self, path: str, kind: str, on_bad_lines: str, report: BadLineReport):
        self.path, self.kind, self.mode, self.report = path, kind, on_bad_lines, report

    def bad(self, line: int, reason: str, problem: str, field: Optional[str] = None) -> None:
        if self.mode == "error":
            raise DataValidationError(self.path, line, problem, field=field, reason=reason)
        self.report.add(self.kind, reason, 1, (self.path, line, f"{field + ': ' if field else ''}{problem}"))

    def lines(self, encoding: str, first_line: int = 1) -> Iterator[Tuple[int, str]]:
        """(line number, text) of every non-header line; undecodable lines are reported here."""
        with open(self.path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if number < first_line:
                    continue
                raw = raw.rstrip(b"\r\n")
                try:
                    yield number, raw.decode(encoding)
                except UnicodeDecodeError as e:
                    self.bad(number, UNDECODABLE, f"byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid "
                             f"{encoding} (the file must be {encoding}-encoded)")

    def keep(self, table: Dict[int, Any], key: int, value: Any, line: int) -> None:
        # A repeated id: the later line wins (like duplicate ratings), the earlier one is counted.
        if key in table:
            self.report.add(self.kind, "duplicate_id", 1,
                            (self.path, line, f"id {key} repeated; the later line is used"))
        table[key] = value


def _int(text: str) -> Optional[int]:
    try:
        return int(text.strip())
    except ValueError:
        return None


def read_users(data_dir: str, layout: Layout, on_bad_lines: str, report: BadLineReport) -> Optional[Dict[int, dict]]:
    """user id -> {"gender", "age", "occupation", "zip"} raw values, or None if the set has no users file."""
    if layout.users_file is None:
        return None
    path = os.path.join(data_dir, layout.users_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: users file missing; {layout.name} ships {layout.users_file} with the users' "
                                "side features (gender, age, occupation, zip code). Restore it (unzip the set "
                                "again), or pass the --dataset of the set this directory really holds")
    side = _SideFile(path, "users", on_bad_lines, report)
    users: Dict[int, dict] = {}
    if layout.name == "ml-100k":  # user id | age | gender | occupation | zip code
        sep, order = "|", ("id", "age", "gender", "occupation", "zip")
    else:  # UserID::Gender::Age::Occupation::Zip-code
        sep, order = "::", ("id", "gender", "age", "occupation", "zip")
    for number, text in side.lines("latin-1"):
        parts = text.split(sep)
        if len(parts) != 5:
            side.bad(number, WRONG_FIELD_COUNT, f"expected 5 fields separated by {sep!r}, found {len(parts)}")
            continue
        rec = dict(zip(order, (p.strip() for p in parts)))
        uid, age = _int(rec["id"]), _int(rec["age"])
        if uid is None or uid < 1:
            side.bad(number, BAD_USER_ID, f"{rec['id']!r} is not a positive integer id", "user id")
        elif rec["gender"] not in ("M", "F"):
            side.bad(number, BAD_VALUE, f"{rec['gender']!r} is not M or F", "gender")
        elif age is None or age < 1 or (layout.name != "ml-100k" and age not in F.AGE_GROUPS):
            allowed = "an age in years" if layout.name == "ml-100k" else f"one of {F.AGE_GROUPS}"
            side.bad(number, BAD_VALUE, f"{rec['age']!r} is not {allowed}", "age")
        elif not rec["occupation"] or (layout.name != "ml-100k" and _int(rec["occupation"]) is None):
            side.bad(number, BAD_VALUE, f"{rec['occupation']!r} is not an occupation", "occupation")
        else:
            side.keep(users, uid, {"gender": rec["gender"], "age": age, "occupation": rec["occupation"],
                                   "zip": rec["zip"]}, number)
    return users


ML100K_GENRES = ("unknown",) + F.MOVIELENS_GENRES  # u.item's 19 flag columns, in u.genre order


def read_movies(data_dir: str, layout: Layout, on_bad_lines: str, report: BadLineReport) -> Dict[int, dict]:
    """movie id -> {"title", "genres": [names], "year": int (0 unknown)}."""
    path = os.path.join(data_dir, layout.movies_file)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: movies file missing ({layout.name} ships {layout.movies_file})")
    side = _SideFile(path, "movies", on_bad_lines, report)
    movies: Dict[int, dict] = {}
    if layout.name == "ml-100k":
        genre_names = _ml100k_genres(data_dir)
        n = 5 + len(genre_names)
        for number, text in side.lines(layout.movies_encoding):
            parts = text.split("|")
            if len(parts) != n:
                side.bad(number, WRONG_FIELD_COUNT, f"expected {n} fields separated by '|', found {len(parts)}")
                continue
            mid, flags = _int(parts[0]), parts[5:]
            if mid is None or mid < 1:
                side.bad(number, BAD_ITEM_ID, f"{parts[0]!r} is not a positive integer id", "movie id")
            elif any(f not in ("0", "1") for f in flags):
                side.bad(number, BAD_VALUE, "genre flags must be 0 or 1", "genres")
            else:
                genres = [g for g, f in zip(genre_names, flags) if f == "1" and g not in F.NO_GENRE]
                year = F.date_year(parts[2]) or F.title_year(parts[1])
                side.keep(movies, mid, {"title": parts[1], "genres": genres, "year": year}, number)
        return movies

    csv_layout = layout.movies_file.endswith(".csv")
    if csv_layout:
        _check_header(path, MOVIES_CSV_HEADER, "utf-8")
    for number, text in side.lines(layout.movies_encoding, first_line=2 if csv_layout else 1):
        try:
            parts = next(csv.reader([text], strict=True)) if csv_layout else text.split("::")
        except (csv.Error, StopIteration) as e:
            side.bad(number, WRONG_FIELD_COUNT, f"cannot parse the CSV line ({e})")
            continue
        if len(parts) != 3:
            sep = "','" if csv_layout else "'::'"
            side.bad(number, WRONG_FIELD_COUNT, f"expected 3 fields (id, title, genres) separated by {sep}, "
                     f"found {len(parts)}" + (" (quote titles that contain commas)" if csv_layout else ""))
            continue
        mid = _int(parts[0])
        if mid is None or mid < 1:
            side.bad(number, BAD_ITEM_ID, f"{parts[0]!r} is not a positive integer id", "movieId")
            continue
        side.keep(movies, mid, {"title": parts[1], "genres": F.split_genres(parts[2]),
                                "year": F.title_year(parts[1])}, number)
    return movies


def _ml100k_genres(data_dir: str) -> Tuple[str, ...]:
    """Genre names of u.item's flag columns: from u.genre when present, else the published list."""
    path = os.path.join(data_dir, "u.genre")
    if not os.path.isfile(path):
        return ML100K_GENRES
    pairs = []
    with open(path, encoding="latin-1") as f:
        for line in f:
            name, _, idx = line.strip().rpartition("|")
            if name and idx.isdigit():
                pairs.append((int(idx), name))
    return tuple(name for _, name in sorted(pairs)) or ML100K_GENRES
