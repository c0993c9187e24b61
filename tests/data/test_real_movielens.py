"""The real GroupLens ml-100k and ml-latest-small (../shared/data/movielens), prepared end to end
and checked against their published counts."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tests.conftest import REAL_MOVIELENS, missing_environment
from twotower_lit.config import PrepareConfig
from twotower_lit.data import schema
from twotower_lit.data.layouts import detect_layout
from twotower_lit.data.prepare import prepare_dataset


def _real(name: str):
    path = REAL_MOVIELENS / name
    if not (path.is_dir() and any(path.iterdir())):
        missing_environment("movielens", f"real {name} not present at {path} (set TWOTOWER_REAL_MOVIELENS to its "
                                         "parent folder)")
    return path


def _all_rows(out) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for s in schema.SPLITS for p in sorted((out / s).glob("*.parquet"))])


def test_ml100k(tmp_path):
    raw = _real("ml-100k")
    assert detect_layout(str(raw)) == "ml-100k"
    m = prepare_dataset(PrepareConfig(data_dir=str(raw)), str(tmp_path / "out"), log=lambda _: None)
    c = m["counts"]
    # u.info states the headline counts of the set
    info = dict(reversed(line.split()) for line in (raw / "u.info").read_text().splitlines() if line.strip())
    assert (c["raw_rows"], c["users"], c["items"]) == (int(info["ratings"]), int(info["users"]), int(info["items"]))
    assert (c["raw_rows"], c["users"], c["items"]) == (100_000, 943, 1_682)
    assert c["skipped"] == {} and c["duplicates"] == 0 and c["train"] + c["val"] + c["test"] == 100_000
    assert c["items_not_in_movies"] == 0 and c["users_not_in_users_file"] == 0
    rows = _all_rows(tmp_path / "out")
    # published rating counts (shared/data/movielens/README.md): 4 and 5 stars are the positives
    assert int(pa.compute.sum(rows["label"]).as_py()) == 34_174 + 21_201
    assert m["vocab"]["gender"] == ["F", "M"] and len(m["vocab"]["occupation"]) == 21
    assert len(m["vocab"]["genres"]) == 18 and "unknown" not in m["vocab"]["genres"]
    users = pq.read_table(tmp_path / "out" / "users.parquet").to_pandas()
    assert (users[["gender", "age", "occupation", "zip"]] > 0).all().all()  # every user has all features
    u1 = users[users.user_id == 1].iloc[0]  # u.user line 1: 1|24|M|technician|85711
    assert m["vocab"]["age"][u1.age - 1] == 18 and m["vocab"]["occupation"][u1.occupation - 1] == "technician"
    assert m["vocab"]["zip"][u1.zip - 1] == "857"
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas()
    toy = items[items.item_id == 1].iloc[0]  # 1|Toy Story (1995)|01-Jan-1995|...|Animation, Children's, Comedy
    assert toy.title == "Toy Story (1995)" and m["vocab"]["year"][toy.year - 1] == 1995
    assert [m["vocab"]["genres"][g - 1] for g in toy.genres] == ["Animation", "Children's", "Comedy"]
    assert (items.year > 0).sum() == 1_681  # one item ("unknown") has no date


def test_ml_latest_small(tmp_path):
    raw = _real("ml-latest-small")
    assert detect_layout(str(raw)) == "ml-latest-small"
    m = prepare_dataset(PrepareConfig(data_dir=str(raw), split="temporal"), str(tmp_path / "out"),
                        log=lambda _: None)
    c = m["counts"]
    assert (c["raw_rows"], c["users"], c["items"]) == (100_836, 610, 9_742)
    assert c["items_without_ratings"] == 9_742 - 9_724 and c["skipped"] == {} and c["duplicates"] == 0
    assert c["test"] == c["val"] == 610  # temporal: one each per user (every user has >= 20 ratings)
    rows = _all_rows(tmp_path / "out")
    ratings = rows["rating"].to_numpy()
    assert set(np.unique(ratings)) == {0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 4.5, 5.0}
    assert int((ratings == 0.5).sum()) == 1_370 and int((ratings == 5.0).sum()) == 13_211
    assert m["user_features"] == ["user"] and "IMAX" in m["vocab"]["genres"]
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pandas()
    quoted = items[items.item_id == 11].iloc[0]  # 11,"American President, The (1995)",Comedy|Drama|Romance
    assert quoted.title == "American President, The (1995)"
    assert [m["vocab"]["genres"][g - 1] for g in quoted.genres] == ["Comedy", "Drama", "Romance"]
