r"""The GroupLens file layouts, and detecting which one a directory holds.

| set(s)                                   | ratings              | users       | movies                  |
|------------------------------------------|----------------------|-------------|-------------------------|
| ml-100k                                  | u.data (tab)         | u.user (\|) | u.item (\|, Latin-1)     |
| ml-1m                                    | ratings.dat (::)     | users.dat   | movies.dat (::, Latin-1) |
| ml-10m                                   | ratings.dat (::), ½★ | (none)      | movies.dat (::, Latin-1) |
| ml-20m, -25m, -32m, -latest, -latest-small | ratings.csv (header) | (none)      | movies.csv (UTF-8, quoted) |
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Tuple

from twotower_lit.config import DATASETS

CSV_SETS = ("ml-20m", "ml-25m", "ml-32m", "ml-latest", "ml-latest-small")
CSV_HEADER = ("userId", "movieId", "rating", "timestamp")
MOVIES_CSV_HEADER = ("movieId", "title", "genres")


@dataclass(frozen=True)
class Layout:
    """How one GroupLens set stores its files."""

    name: str                       # the dataset name (one of config.DATASETS)
    ratings_file: str
    delimiter: str                  # ratings field separator
    header: Optional[Tuple[str, ...]]  # expected header line of the ratings file, if any
    rating_step: float              # 1.0: whole stars 1..5; 0.5: half stars 0.5..5
    users_file: Optional[str]
    movies_file: str
    movies_encoding: str

    @property
    def rating_range(self) -> Tuple[float, float]:
        return (1.0, 5.0) if self.rating_step == 1.0 else (0.5, 5.0)


_ML100K = Layout("ml-100k", "u.data", "\t", None, 1.0, "u.user", "u.item", "latin-1")
_ML1M = Layout("ml-1m", "ratings.dat", "::", None, 1.0, "users.dat", "movies.dat", "latin-1")
_ML10M = Layout("ml-10m", "ratings.dat", "::", None, 0.5, None, "movies.dat", "latin-1")


def layout_for(dataset: str) -> Layout:
    """The layout of a dataset name (``ml-100k`` ... ``ml-latest-small``)."""
    if dataset == "ml-100k":
        return _ML100K
    if dataset == "ml-1m":
        return _ML1M
    if dataset == "ml-10m":
        return _ML10M
    if dataset in CSV_SETS:
        return Layout(dataset, "ratings.csv", ",", CSV_HEADER, 0.5, None, "movies.csv", "utf-8")
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {', '.join(DATASETS)}")


def _has_half_stars(path: str, block: int = 1 << 24) -> bool:
    """True when a ``::`` ratings file holds a half-star rating (only ml-10m's have them). Only the
    rating field can hold a '.', so a byte search suffices; it stops at the first hit."""
    needle, tail = b".5::", b""
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            if not data:
                return False
            data = tail + data
            if needle in data:
                return True
            tail = data[-(len(needle) - 1):]


def detect_layout(data_dir: str) -> str:
    """Dataset name of a raw MovieLens directory, from the files it holds.

    ``u.data`` -> ml-100k; ``ratings.dat`` with ``users.dat`` -> ml-1m; ``ratings.dat`` with
    half-star ratings -> ml-10m (which ships no users file); ``ratings.dat`` with whole stars only
    and no ``users.dat`` is refused: it looks like ml-1m with its users file missing, and a missing
    file is no evidence, so ``--dataset`` decides. ``ratings.csv`` -> the directory's own name when
    it is one of the CSV sets (they share one layout), else ``ml-latest``. Raises
    ``FileNotFoundError`` naming what was looked for or what is missing.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: not a directory (pass --data-dir with a raw MovieLens directory)")
    names = set(os.listdir(data_dir))
    if "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        if "users.dat" in names:
            return "ml-1m"
        if _has_half_stars(os.path.join(data_dir, "ratings.dat")):
            return "ml-10m"
        raise FileNotFoundError(
            f"{os.path.join(data_dir, 'users.dat')} is missing: {data_dir} holds ratings.dat with whole-star ratings "
            "only, as ml-1m ships it, but not ml-1m's users.dat (ml-10m has half-star ratings and no users file). "
            "Without users.dat the users' gender, age, occupation and zip code are absent and the model learns from "
            "ratings alone. Restore users.dat (unzip ml-1m.zip again), or say which set this is: --dataset ml-1m "
            "needs users.dat, --dataset ml-10m prepares the ratings without user features")
    if "ratings.csv" in names:
        base = os.path.basename(os.path.normpath(data_dir)).lower()
        return base if base in CSV_SETS else "ml-latest"
    raise FileNotFoundError(
        f"{data_dir}: no MovieLens ratings file found (looked for u.data, ratings.dat, ratings.csv); "
        "pass a directory unpacked from a GroupLens zip, or --download <name>")
