"""Readers of every GroupLens layout: clean files, each class of malformed line in error and skip
mode (file:line, field, counts), side files, header and line-ending handling."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from twotower_lit.data.layouts import detect_layout, layout_for
from twotower_lit.data.readers import read_movies, read_ratings, read_users
from twotower_lit.data.validation import BadLineReport, DataValidationError

LAYOUTS = ("ml-100k", "ml-1m", "ml-10m", "ml-20m", "ml-latest-small")


def rating_line(layout: str, user, item, rating, ts) -> bytes:
    lay = layout_for(layout)
    return lay.delimiter.join(str(v) for v in (user, item, rating, ts)).encode()


def replace_line(path: Path, line_no: int, content: bytes) -> None:
    """Replace 1-based line ``line_no`` of ``path`` with ``content``."""
    lines = path.read_bytes().split(b"\n")
    lines[line_no - 1] = content
    path.write_bytes(b"\n".join(lines))


def count_lines(path: Path, header: bool) -> int:
    return path.read_bytes().count(b"\n") - int(header)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_clean_file_reads_every_line(layout, synthetic_movielens):
    path = synthetic_movielens(layout)
    assert detect_layout(str(path)) == layout
    lay = layout_for(layout)
    report = BadLineReport()
    ratings = read_ratings(str(path), lay, "error", report)
    n = count_lines(path / lay.ratings_file, lay.header is not None)
    assert len(ratings) == ratings.lines_read == n == 3000
    assert report.total == 0
    lo, hi = lay.rating_range
    assert ratings.rating.min() >= lo and ratings.rating.max() <= hi
    assert (ratings.user_id >= 1).all() and (ratings.item_id >= 1).all()
    movies = read_movies(str(path), lay, "error", report)
    assert set(np.unique(ratings.item_id)) <= set(movies)
    users = read_users(str(path), lay, "error", report)
    assert (users is None) == (lay.users_file is None)
    if users is not None:
        assert set(np.unique(ratings.user_id)) == set(users)


def test_detect_layout_names(synthetic_movielens, tmp_path):
    assert detect_layout(str(synthetic_movielens("ml-100k"))) == "ml-100k"
    assert detect_layout(str(synthetic_movielens("ml-1m"))) == "ml-1m"
    assert detect_layout(str(synthetic_movielens("ml-10m"))) == "ml-10m"  # ratings.dat without users.dat
    assert detect_layout(str(synthetic_movielens("ml-25m"))) == "ml-25m"  # CSV: the folder's name
    other = tmp_path / "my-csv-copy"
    other.mkdir()
    (other / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    assert detect_layout(str(other)) == "ml-latest"
    with pytest.raises(FileNotFoundError, match="no MovieLens ratings file"):
        detect_layout(str(tmp_path))


# (name, bad line builder, reason, field named in the error)
BAD_LINES = [
    ("field_count", lambda L: rating_line(L, 1, 2, 3, 978300760).rsplit(layout_for(L).delimiter.encode(), 1)[0],
     "wrong_field_count", None),
    ("empty_line", lambda L: b"", "wrong_field_count", None),
    ("user_not_int", lambda L: rating_line(L, "u12", 2, 3, 978300760), "bad_user_id", "userId"),
    ("item_not_int", lambda L: rating_line(L, 1, "2.5", 3, 978300760), "bad_item_id", "movieId"),
    ("user_zero", lambda L: rating_line(L, 0, 2, 3, 978300760), "bad_user_id", "userId"),
    ("item_zero", lambda L: rating_line(L, 1, 0, 3, 978300760), "bad_item_id", "movieId"),
    ("item_negative", lambda L: rating_line(L, 1, -4, 3, 978300760), "bad_item_id", "movieId"),
    ("rating_high", lambda L: rating_line(L, 1, 2, 7, 978300760), "bad_rating", "rating"),
    ("rating_zero", lambda L: rating_line(L, 1, 2, 0, 978300760), "bad_rating", "rating"),
    ("rating_text", lambda L: rating_line(L, 1, 2, "four", 978300760), "bad_rating", "rating"),
    ("timestamp_text", lambda L: rating_line(L, 1, 2, 3, "2001-01-01"), "bad_timestamp", "timestamp"),
    ("timestamp_negative", lambda L: rating_line(L, 1, 2, 3, -5), "bad_timestamp", "timestamp"),
    # one second after 2100-01-01 00:00 UTC: the first value past the readers' bound
    ("timestamp_after_2100", lambda L: rating_line(L, 1, 2, 3, 4_102_444_801), "bad_timestamp", "timestamp"),
    ("undecodable", lambda L: rating_line(L, 1, 2, 3, 978300760)[:-3] + b"\xff\xfe0", "undecodable", None),
]


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-10m", "ml-32m"])
@pytest.mark.parametrize("name,build,reason,field", BAD_LINES, ids=[b[0] for b in BAD_LINES])
def test_bad_ratings_line(layout, name, build, reason, field, movielens_copy):
    path = movielens_copy(layout)
    lay = layout_for(layout)
    file = path / lay.ratings_file
    bad_line = 17 + (lay.header is not None)
    replace_line(file, bad_line, build(layout))

    with pytest.raises(DataValidationError) as info:
        read_ratings(str(path), lay, "error", BadLineReport())
    err = info.value
    assert (err.file, err.line, err.reason, err.field) == (str(file), bad_line, reason, field)
    assert str(err).startswith(f"{file}:{bad_line}: ")
    assert "--on-bad-lines skip" in str(err)  # says what to do

    report = BadLineReport()
    ratings = read_ratings(str(path), lay, "skip", report)
    assert report.as_dict() == {f"ratings.{reason}": 1}
    assert ratings.lines_read == 3000 and len(ratings) == 2999
    assert report.examples and report.examples[0].startswith(f"{file}:{bad_line}:")


@pytest.mark.parametrize("layout", ["ml-1m", "ml-32m"])
def test_boundary_values_are_accepted(layout, movielens_copy):
    """The last valid values on each side of the checks: id 1, time 0 (1970) and 2100-01-01 00:00 UTC."""
    path = movielens_copy(layout)
    lay = layout_for(layout)
    head = lay.header is not None
    edits = {5: (1, 1, 3, 0), 6: (7, 1, 4, 4_102_444_800), 7: (1, 9, 5, 4_102_444_800)}
    for line, values in edits.items():
        replace_line(path / lay.ratings_file, line + head, rating_line(layout, *values))
    ratings = read_ratings(str(path), lay, "error", BadLineReport())
    assert len(ratings) == 3000
    for line, (user, item, rating, ts) in edits.items():
        row = line - 1
        assert (ratings.user_id[row], ratings.item_id[row], ratings.rating[row], ratings.timestamp[row]) == \
            (user, item, rating, ts)


def test_half_stars_follow_the_layout(movielens_copy):
    for layout, ok in (("ml-1m", False), ("ml-100k", False), ("ml-10m", True), ("ml-latest", True)):
        path = movielens_copy(layout) if layout != "ml-latest" else movielens_copy("ml-20m")
        lay = layout_for("ml-20m" if layout == "ml-latest" else layout)
        line = 5 + (lay.header is not None)
        replace_line(path / lay.ratings_file, line, rating_line(lay.name, 1, 2, 3.5, 978300760))
        if ok:
            ratings = read_ratings(str(path), lay, "error", BadLineReport())
            assert ratings.rating[line - 1 - (lay.header is not None)] == 3.5
        else:
            with pytest.raises(DataValidationError, match="whole stars 1..5") as info:
                read_ratings(str(path), lay, "error", BadLineReport())
            assert info.value.line == line
        shutil.rmtree(path.parent)  # the next layout gets a fresh copy


def test_many_bad_lines_counted_per_reason_first_one_reported(movielens_copy):
    path = movielens_copy("ml-1m")
    lay = layout_for("ml-1m")
    file = path / "ratings.dat"
    edits = {40: b"1::2::9::978300760", 12: b"x::2::3::978300760", 300: b"1::2::3", 301: b"1::2::3::abc",
             2000: b"1::2::3::978300760::extra"}
    for line, content in edits.items():
        replace_line(file, line, content)
    with pytest.raises(DataValidationError) as info:
        read_ratings(str(path), lay, "error", BadLineReport())
    assert info.value.line == 12 and info.value.field == "userId"
    report = BadLineReport()
    ratings = read_ratings(str(path), lay, "skip", report)
    assert report.as_dict() == {"ratings.bad_rating": 1, "ratings.bad_timestamp": 1, "ratings.bad_user_id": 1,
                                "ratings.wrong_field_count": 2}
    assert len(ratings) == 3000 - len(edits)


def test_crlf_line_endings_read_like_lf(movielens_copy):
    path = movielens_copy("ml-latest-small")
    lay = layout_for("ml-latest-small")
    plain = read_ratings(str(path), lay, "error", BadLineReport())
    file = path / "ratings.csv"
    file.write_bytes(file.read_bytes().replace(b"\n", b"\r\n"))
    crlf = read_ratings(str(path), lay, "error", BadLineReport())
    for a, b in zip((plain.user_id, plain.item_id, plain.rating, plain.timestamp),
                    (crlf.user_id, crlf.item_id, crlf.rating, crlf.timestamp)):
        np.testing.assert_array_equal(a, b)


def test_csv_header_is_checked(movielens_copy):
    path = movielens_copy("ml-20m")
    replace_line(path / "ratings.csv", 1, b"user,item,rating,time")
    with pytest.raises(DataValidationError, match="expected the header") as info:
        read_ratings(str(path), layout_for("ml-20m"), "skip", BadLineReport())
    assert info.value.line == 1  # even in skip mode: a wrong header means a wrong file, not a bad line


def test_missing_ratings_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="ratings.dat"):
        read_ratings(str(tmp_path), layout_for("ml-1m"), "error", BadLineReport())


# ---------------------------------------------------------------------------------------------
# side files


@pytest.mark.parametrize("layout,line,content,reason,field", [
    ("ml-1m", 3, "3::X::25::4::12345", "bad_value", "gender"),
    ("ml-1m", 4, "4::M::33::4::12345", "bad_value", "age"),  # ml-1m ages are group codes
    ("ml-1m", 5, "5::M::25::4", "wrong_field_count", None),
    ("ml-100k", 6, "6|forty|M|writer|12345", "bad_value", "age"),
    ("ml-100k", 7, "x|40|M|writer|12345", "bad_user_id", "user id"),
])
def test_bad_users_line(layout, line, content, reason, field, movielens_copy):
    path = movielens_copy(layout)
    lay = layout_for(layout)
    file = path / lay.users_file
    replace_line(file, line, content.encode("latin-1"))
    with pytest.raises(DataValidationError) as info:
        read_users(str(path), lay, "error", BadLineReport())
    assert (info.value.file, info.value.line, info.value.reason, info.value.field) == (str(file), line, reason, field)
    report = BadLineReport()
    users = read_users(str(path), lay, "skip", report)
    assert report.as_dict() == {f"users.{reason}": 1}
    assert len(users) == count_lines(file, False) - 1


def test_users_ml100k_raw_values(synthetic_movielens):
    users = read_users(str(synthetic_movielens("ml-100k")), layout_for("ml-100k"), "error", BadLineReport())
    first_line = (synthetic_movielens("ml-100k") / "u.user").read_text().splitlines()[0].split("|")
    rec = users[int(first_line[0])]
    assert rec == {"gender": first_line[2], "age": int(first_line[1]), "occupation": first_line[3],
                   "zip": first_line[4]}


def test_movies_csv_quoted_titles_and_genres(movielens_copy):
    path = movielens_copy("ml-latest-small")
    file = path / "movies.csv"
    text = file.read_text(encoding="utf-8").splitlines()
    text[1] = '1,"American President, The (1995)",Comedy|Drama|Romance'
    text[2] = '2,"Cité des enfants perdus, La (1995)",(no genres listed)'
    file.write_text("\n".join(text) + "\n", encoding="utf-8")
    movies = read_movies(str(path), layout_for("ml-latest-small"), "error", BadLineReport())
    assert movies[1] == {"title": "American President, The (1995)", "genres": ["Comedy", "Drama", "Romance"],
                         "year": 1995}
    assert movies[2]["title"].startswith("Cité") and movies[2]["genres"] == []


def test_movies_latin1_and_undecodable_utf8(movielens_copy):
    path = movielens_copy("ml-1m")
    replace_line(path / "movies.dat", 2, "2::Café Olé (1999)::Comedy".encode("latin-1"))
    movies = read_movies(str(path), layout_for("ml-1m"), "error", BadLineReport())
    assert movies[int((path / "movies.dat").read_bytes().split(b"\n")[1].split(b"::")[0])]["title"] == "Café Olé (1999)"

    csv_path = movielens_copy("ml-25m")
    replace_line(csv_path / "movies.csv", 4, "3,Café (1999),Comedy".encode("latin-1"))  # not UTF-8
    with pytest.raises(DataValidationError) as info:
        read_movies(str(csv_path), layout_for("ml-25m"), "error", BadLineReport())
    assert info.value.line == 4 and info.value.reason == "undecodable" and "utf-8" in str(info.value)
    report = BadLineReport()
    read_movies(str(csv_path), layout_for("ml-25m"), "skip", report)
    assert report.as_dict() == {"movies.undecodable": 1}


def test_movies_ml100k_genre_flags_and_release_year(movielens_copy):
    path = movielens_copy("ml-100k")
    flags = ["0"] * 19
    flags[1] = flags[8] = "1"  # Action, Drama (u.genre order)
    replace_line(path / "u.item", 1, f"1|Toy Story|01-Jan-1995||http://x|{'|'.join(flags)}".encode("latin-1"))
    flags_unknown = ["1"] + ["0"] * 18
    replace_line(path / "u.item", 2, f"2|unknown|||http://x|{'|'.join(flags_unknown)}".encode("latin-1"))
    movies = read_movies(str(path), layout_for("ml-100k"), "error", BadLineReport())
    assert movies[1] == {"title": "Toy Story", "genres": ["Action", "Drama"], "year": 1995}
    assert movies[2]["genres"] == [] and movies[2]["year"] == 0


def test_duplicate_movie_ids_keep_the_later_line(movielens_copy):
    path = movielens_copy("ml-10m")
    lines = (path / "movies.dat").read_bytes().split(b"\n")
    mid = int(lines[0].split(b"::")[0])
    replace_line(path / "movies.dat", 3, f"{mid}::Second Title (2001)::Drama".encode())
    report = BadLineReport()
    movies = read_movies(str(path), layout_for("ml-10m"), "skip", report)
    assert movies[mid]["title"] == "Second Title (2001)"
    assert report.as_dict() == {"movies.duplicate_id": 1}


def test_small_blocks_keep_line_numbers_and_values(movielens_copy, monkeypatch):
    """The robust parser works block by block (32 MiB in production); tiny blocks put bad lines
    in different blocks and cut blocks at every kind of place."""
    from twotower_lit.data import readers

    path = movielens_copy("ml-25m")
    lay = layout_for("ml-25m")
    clean = read_ratings(str(path), lay, "error", BadLineReport())
    file = path / "ratings.csv"
    edits = {900: b"1,2,3", 50: b"1,2,11,978300760", 2500: b"1,2,3,x"}  # value error first, then structural
    for line, content in edits.items():
        replace_line(file, line, content)
    monkeypatch.setattr(readers, "_BLOCK_BYTES", 997)
    with pytest.raises(DataValidationError) as info:
        read_ratings(str(path), lay, "error", BadLineReport())
    assert (info.value.line, info.value.reason) == (50, "bad_rating")
    report = BadLineReport()
    got = read_ratings(str(path), lay, "skip", report)
    assert report.as_dict() == {"ratings.bad_rating": 1, "ratings.bad_timestamp": 1, "ratings.wrong_field_count": 1}
    keep = np.setdiff1d(np.arange(3000), np.array(list(edits)) - 2)  # data row r is on line r + 2
    np.testing.assert_array_equal(got.user_id, clean.user_id[keep])
    np.testing.assert_array_equal(got.timestamp, clean.timestamp[keep])
    np.testing.assert_array_equal(got.rating, clean.rating[keep])
