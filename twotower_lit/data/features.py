"""Raw MovieLens side values -> the normalised values and vocabulary indices of the model.

Shared by `prepare` (building ``users.parquet`` / ``items.parquet``) and by the serving code
(encoding a cold-start user sent in a request), so both map a raw value to the same index.
Only the standard library and numpy are imported here: the serving image has torch + numpy and
nothing else, so this module must not pull in pyarrow, pandas, torch or torchrec.

Conventions (see ``schema.py``): a vocabulary is a list; value ``vocab[name][p]`` has index
``p + 1``; index 0 means unknown / absent / out of vocabulary.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

# ml-1m's age groups (README: 1 "Under 18", 18 "18-24", 25 "25-34", 35 "35-44", 45 "45-49",
# 50 "50-55", 56 "56+"). ml-100k's raw ages are bucketed into the same groups so an age index
# means the same thing whichever set a model was trained on.
AGE_GROUPS = (1, 18, 25, 35, 45, 50, 56)

# Genre names of the GroupLens sets. ml-100k and ml-1m say "Children's", ml-latest and later say
# "Children" and add "IMAX"; both spellings are kept as they appear (a vocabulary is per set).
MOVIELENS_GENRES = (
    "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War",
    "Western",
)
# Markers that mean "no genre": they become an empty genre list, not a genre of their own.
NO_GENRE = ("unknown", "(no genres listed)")

USER_FEATURE_NAMES = ("gender", "age", "occupation", "zip")

_TITLE_YEAR = re.compile(r"\((\d{4})(?:\s*[-\u2013]\s*\d{0,4})?\)\s*$")
_DATE_YEAR = re.compile(r"(\d{4})\s*$")


def age_group(age: Any) -> int:
    """Raw age (years) or an ml-1m group code -> ml-1m group code; 0 when unknown.

    The ml-1m codes are fixed points (``age_group(25) == 25``), so ml-1m and ml-100k values can be
    passed alike.
    """
    try:
        years = int(float(age))
    except (TypeError, ValueError, OverflowError):  # "inf" and "1e999" are not ages
        return 0
    if years <= 0:
        return 0
    group = AGE_GROUPS[0]
    for lower in AGE_GROUPS[1:]:
        if years >= lower:
            group = lower
    return group


def zip_prefix(zip_code: Any, n: int) -> str:
    """First ``n`` characters of a zip code, upper-cased; '' when absent (unknown)."""
    if zip_code is None:
        return ""
    return str(zip_code).strip().upper()[: max(0, int(n))]


def normalise_gender(gender: Any) -> str:
    """'M' / 'F' (first letter, upper case); '' when absent."""
    if gender is None:
        return ""
    return str(gender).strip().upper()[:1]


def normalise_occupation(occupation: Any) -> str:
    """Occupation as the vocabulary stores it: ml-1m codes as decimal strings ('12'), ml-100k
    names lower case ('programmer'); '' when absent."""
    if occupation is None:
        return ""
    text = str(occupation).strip().lower()
    try:
        return str(int(float(text)))  # 12, 12.0 and "12" are one code
    except (ValueError, OverflowError):  # "inf" names no code
        return text


def title_year(title: Optional[str]) -> int:
    """Release year from a GroupLens title like 'Heat (1995)' (or '(2006-2007)'); 0 if none."""
    if not title:
        return 0
    m = _TITLE_YEAR.search(title)
    return int(m.group(1)) if m else 0


def date_year(date: Optional[str]) -> int:
    """Year from ml-100k's release date '01-Jan-1995'; 0 when empty or unparseable."""
    if not date:
        return 0
    m = _DATE_YEAR.search(date.strip())
    return int(m.group(1)) if m else 0


def split_genres(text: Optional[str]) -> List[str]:
    """'Adventure|Animation' -> ['Adventure', 'Animation'] (no-genre markers dropped)."""
    if not text:
        return []
    return [g for g in (part.strip() for part in text.split("|")) if g and g not in NO_GENRE]


def _normalisers(zip_chars: int):
    return {
        "gender": normalise_gender,
        "age": age_group,
        "occupation": normalise_occupation,
        "zip": lambda v: zip_prefix(v, zip_chars),
    }


def _vocab_key(name: str, value: Any) -> Any:
    # Vocabulary entries come back from JSON as str or int; compare in one canonical form.
    if name == "age":
        return int(value)
    if name == "occupation":
        return normalise_occupation(value)
    return str(value)


class UserFeatureEncoder:
    """Maps raw user side values to vocabulary indices; build once, call per user.

    Only features that have a vocabulary (the set has them) are encoded; absent or unknown
    values give 0.
    """

    def __init__(self, vocab: Mapping[str, Sequence[Any]], zip_prefix: int):
        norm = _normalisers(zip_prefix)
        self.features = tuple(name for name in USER_FEATURE_NAMES if name in vocab)
        self._norm = {name: norm[name] for name in self.features}
        self._index: Dict[str, Dict[Any, int]] = {
            name: {_vocab_key(name, v): i + 1 for i, v in enumerate(vocab[name])} for name in self.features
        }

    def __call__(self, raw: Mapping[str, Any]) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for name in self.features:
            value = self._norm[name](raw.get(name))
            out[name] = self._index[name].get(value, 0) if value not in ("", 0) else 0
        return out


def encode_user_features(raw: Mapping[str, Any], vocab: Mapping[str, Sequence[Any]], zip_prefix: int) -> Dict[str, int]:
    """Raw ``{"gender", "age", "occupation", "zip"}`` -> ``{name: index}`` using a manifest's vocab.

    Unknown or missing values map to 0. For many users build a `UserFeatureEncoder` once instead.
    """
    return UserFeatureEncoder(vocab, zip_prefix)(raw)


def build_vocab(values: Iterable[Any], empty: Any = "") -> List[Any]:
    """Sorted distinct values, without the 'unknown' marker (it is index 0, not an entry)."""
    return sorted({v for v in values if v != empty and v is not None})


def vocab_index(vocab: Sequence[Any]) -> Dict[Any, int]:
    """value -> index (position + 1)."""
    return {v: i + 1 for i, v in enumerate(vocab)}
