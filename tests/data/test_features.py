"""Feature helpers shared with serving: age groups, zip prefix, years, genres, user encoding."""
from __future__ import annotations

import subprocess
import sys

import pytest

from twotower_lit.data.features import (AGE_GROUPS, UserFeatureEncoder, age_group, date_year, encode_user_features,
                                        normalise_occupation, split_genres, title_year, zip_prefix)


@pytest.mark.parametrize("age,group", [(7, 1), (17, 1), (18, 18), (24, 18), (25, 25), (34, 25), (35, 35),
                                       (44, 35), (45, 45), (49, 45), (50, 50), (55, 50), (56, 56), (73, 56),
                                       ("33", 25), (0, 0), (None, 0), ("n/a", 0)])
def test_age_group_buckets_raw_ages_into_ml1m_groups(age, group):
    assert age_group(age) == group


@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "1e999", float("inf"), "nan"])
def test_non_finite_ages_and_occupations_are_unknown_not_a_crash(value):
    assert age_group(value) == 0
    assert normalise_occupation(value) == str(value).strip().lower()


def test_ml1m_group_codes_are_fixed_points():
    assert [age_group(g) for g in AGE_GROUPS] == list(AGE_GROUPS)


def test_zip_prefix_and_years_and_genres():
    assert zip_prefix("55455-1234", 3) == "554" and zip_prefix(" t8h1n", 2) == "T8" and zip_prefix(None, 3) == ""
    assert title_year("Toy Story (1995)") == 1995
    assert title_year("Seven (a.k.a. Se7en) (1995) ") == 1995
    assert title_year("Cosmos (1980–1981)") == 1980
    assert title_year("Babylon 5") == 0 and title_year("") == 0
    assert date_year("01-Jan-1995") == 1995 and date_year("") == 0
    assert split_genres("Action|Sci-Fi") == ["Action", "Sci-Fi"]
    assert split_genres("(no genres listed)") == [] and split_genres("") == []


def test_encode_user_features_uses_manifest_vocab():
    vocab = {"gender": ["F", "M"], "age": list(AGE_GROUPS), "occupation": ["0", "1", "12", "20"],
             "zip": ["554", "900"], "genres": ["Action"]}
    got = encode_user_features({"gender": "m", "age": 30, "occupation": 12, "zip": "90024"}, vocab, 3)
    assert got == {"gender": 2, "age": 3, "occupation": 3, "zip": 2}
    # unknown or missing values -> 0
    assert encode_user_features({"gender": "x", "age": None, "occupation": "99", "zip": "123"}, vocab, 3) == \
        {"gender": 0, "age": 0, "occupation": 0, "zip": 0}
    assert encode_user_features({}, vocab, 3) == {"gender": 0, "age": 0, "occupation": 0, "zip": 0}
    # a set without user side features encodes nothing
    assert encode_user_features({"gender": "M"}, {"genres": ["Drama"]}, 3) == {}
    # ml-100k style occupation names
    enc = UserFeatureEncoder({"occupation": ["programmer", "writer"]}, 3)
    assert enc({"occupation": "Writer "}) == {"occupation": 2}


def test_features_module_imports_without_pyarrow_or_torch():
    code = ("import sys, twotower_lit.data.features as f; "
            "bad = [m for m in ('pyarrow', 'torch', 'torchrec', 'pandas') if m in sys.modules]; "
            "print(','.join(bad))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert out.stdout.strip() == ""
