"""Inputs that must be refused with a message naming the file, not prepared into something wrong:
an empty ratings file, one whose every line was skipped, and a folder whose layout could only be
guessed from a missing side file (ml-1m without users.dat)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from twotower_lit.config import PrepareConfig
from twotower_lit.data.layouts import detect_layout
from twotower_lit.data.prepare import prepare_dataset
from twotower_lit.data.validation import DataValidationError

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


def run(data_dir, out, **options) -> dict:
    return prepare_dataset(PrepareConfig(data_dir=str(data_dir), min_shards=1, **options), str(out),
                           log=lambda _: None)


@pytest.mark.parametrize("layout, content, problem", [
    ("ml-1m", b"", "holds no rating lines"),
    ("ml-100k", b"", "holds no rating lines"),
    ("ml-latest-small", b"userId,movieId,rating,timestamp\n", "holds no rating lines after its header"),
])
def test_an_empty_ratings_file_is_refused(movielens_copy, tmp_path, layout, content, problem):
    raw = movielens_copy(layout)
    ratings = raw / {"ml-1m": "ratings.dat", "ml-100k": "u.data"}.get(layout, "ratings.csv")
    ratings.write_bytes(content)
    for mode in ("error", "skip"):
        with pytest.raises(DataValidationError, match=problem) as info:
            run(raw, tmp_path / "out", on_bad_lines=mode)
        assert str(info.value).startswith(f"{ratings}: ")
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_a_file_whose_every_line_was_skipped_is_refused(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    (raw / "ratings.dat").write_bytes(b"1::2::3\n1::2::11::978300760\nx::1::4::978300760\n")
    with pytest.raises(DataValidationError, match=r"ratings.dat:1: ") as info:
        run(raw, tmp_path / "out")
    with pytest.raises(DataValidationError) as info:
        run(raw, tmp_path / "out", on_bad_lines="skip")
    msg = str(info.value)
    assert msg.startswith(f"{raw / 'ratings.dat'}: every one of its 3 rating lines is malformed")
    assert "bad_rating 1" in msg and "bad_user_id 1" in msg and "wrong_field_count 1" in msg
    assert f"{raw / 'ratings.dat'}:1: " in msg  # the first bad line, to look at
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_nothing_left_after_dropping_neutral_ratings_is_refused(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    (raw / "ratings.dat").write_bytes(b"1::1::3::978300760\n2::1::3::978300761\n")
    with pytest.raises(ValueError, match="every rating is neutral.*--neutral keep"):
        run(raw, tmp_path / "out", neutral="drop")


def test_empty_ratings_through_the_entrypoints(movielens_copy, tmp_path):
    """The prepare and train CLIs (train prepares first; it got as far as an IndexError) say what
    is wrong in one line."""
    raw = movielens_copy("ml-1m")
    (raw / "ratings.dat").write_bytes(b"")
    prep = subprocess.run([sys.executable, "-m", "entrypoints.prepare", "--data-dir", str(raw), "--output-dir",
                           str(tmp_path / "prepared")], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert prep.returncode == 2 and "Traceback" not in prep.stderr
    assert f"{raw / 'ratings.dat'}: holds no rating lines" in prep.stderr
    train = subprocess.run([sys.executable, "-m", "entrypoints.train", "--data-dir", str(raw), "--output-dir",
                            str(tmp_path / "run"), "--accelerator", "cpu", "--progress", "false"],
                           cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert train.returncode == 2 and "Traceback" not in train.stderr
    assert train.stderr.startswith("train: error: ") and f"{raw / 'ratings.dat'}: holds no rating lines" in train.stderr


# ---------------------------------------------------------------------------------------------
# layout detection


def test_ml1m_without_users_dat_is_not_taken_for_ml10m(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")  # the folder is named ml-1m too
    assert raw.name == "ml-1m"
    (raw / "users.dat").unlink()
    with pytest.raises(FileNotFoundError) as info:
        detect_layout(str(raw))
    msg = str(info.value)
    assert msg.startswith(f"{raw / 'users.dat'} is missing")
    assert "gender, age, occupation and zip code are absent" in msg and "--dataset" in msg
    with pytest.raises(FileNotFoundError, match="users.dat is missing"):
        run(raw, tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()

    # --dataset decides: ml-1m needs its users file, ml-10m prepares the ratings alone
    with pytest.raises(FileNotFoundError, match="users.dat: users file missing; ml-1m ships users.dat"):
        run(raw, tmp_path / "out", dataset="ml-1m")
    m = run(raw, tmp_path / "out", dataset="ml-10m")
    assert m["dataset"] == "ml-10m" and m["user_features"] == ["user"] and m["counts"]["raw_rows"] == 3000


def test_half_star_ratings_identify_ml10m(synthetic_movielens, movielens_copy):
    assert detect_layout(str(synthetic_movielens("ml-10m"))) == "ml-10m"
    assert detect_layout(str(synthetic_movielens("ml-1m"))) == "ml-1m"
    raw = movielens_copy("ml-1m")
    (raw / "users.dat").unlink()
    with open(raw / "ratings.dat", "ab") as f:
        f.write(b"1::1::3.5::978300760\n")  # a half star: not ml-1m, whatever side files are there
    assert detect_layout(str(raw)) == "ml-10m"


def test_half_star_search_across_block_boundaries(tmp_path):
    from twotower_lit.data.layouts import _has_half_stars

    path = tmp_path / "ratings.dat"
    path.write_bytes(b"1::2::4::978300760\n1::3::3.5::978300761\n")
    whole = tmp_path / "whole.dat"
    whole.write_bytes(b"1::2::4::978300760\n1::3::5::978300761\n1::4::2::5\n")
    for block in range(1, 45):
        assert _has_half_stars(str(path), block) and not _has_half_stars(str(whole), block)
