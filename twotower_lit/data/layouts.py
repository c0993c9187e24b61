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


def detect_layout(data_dir: str) -> str:
    """Dataset name of a raw MovieLens directory, from the files it holds.

    ``u.data`` -> ml-100k; ``ratings.dat`` with ``users.dat`` -> ml-1m, without -> ml-10m;
    ``ratings.csv`` -> the directory's own name when it is one of the CSV sets (they share one
    layout), else ``ml-latest``. Raises ``FileNotFoundError`` naming what was looked for.
    """
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"{data_dir}: not a directory (pass --data-dir with a raw MovieLens directory)")
    names = set(os.listdir(data_dir))
    if "u.data" in names:
        return "ml-100k"
    if "ratings.dat" in names:
        return "ml-1m" if "users.dat" in names else "ml-10m"
    if "ratings.csv" in names:
        base = os.path.basename(os.path.normpath(data_dir)).lower()
        return base if base in CSV_SETS else "ml-latest"
    raise FileNotFoundError(
        f"{data_dir}: no MovieLens ratings file found (looked for u.data, ratings.dat, ratings.csv); "
        "pass a directory unpacked from a GroupLens zip, or --download <name>")
