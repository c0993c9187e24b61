"""End-to-end prepare: manifest per schema.py, file checksums, labels/neutral, duplicates, side
features, determinism, re-run no-op, crash safety, the entrypoint, and S3 output (moto server)."""
from __future__ import annotations

import dataclasses
import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from twotower_lit.config import PrepareConfig
from twotower_lit.data import schema
from twotower_lit.data.features import AGE_GROUPS, encode_user_features
from twotower_lit.data.prepare import is_prepared, prepare_dataset, read_manifest
from twotower_lit.data.readers import read_ratings
from twotower_lit.data.layouts import layout_for
from twotower_lit.data.validation import BadLineReport, DataValidationError

REPO = Path(__file__).resolve().parents[2]


def run(data_dir, out, **options) -> dict:
    cfg = PrepareConfig(data_dir=str(data_dir), min_shards=2, **options)
    return prepare_dataset(cfg, str(out), log=lambda _: None)


def split_table(out: Path, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in sorted((out / split).glob("part-*.parquet"))])


@pytest.mark.parametrize("layout", ["ml-100k", "ml-1m", "ml-10m", "ml-32m"])
def test_manifest_follows_the_schema(layout, synthetic_movielens, tmp_path):
    raw = synthetic_movielens(layout)
    m = run(raw, tmp_path / "out")
    out = tmp_path / "out"
    assert m == read_manifest(str(out)) and is_prepared(str(out))
    assert m["schema_version"] == schema.SCHEMA_VERSION and m["dataset"] == layout
    assert m["options"]["split"] == "random" and m["options"]["min_shards"] == 2
    assert set(m["source"]["files"]) >= {layout_for(layout).ratings_file}

    c = m["counts"]
    assert c["raw_rows"] == 3000 and c["skipped"] == {} and c["duplicates"] == 0 and c["neutral_dropped"] == 0
    assert c["train"] + c["val"] + c["test"] == 3000

    # files: every one listed with rows and the sha256 of its bytes, and nothing else written
    written = {str(p.relative_to(out)) for p in out.rglob("*.parquet") if "raw" not in p.parts}
    assert set(m["files"]) == written
    for rel, meta in m["files"].items():
        data = (out / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == meta["sha256"]
        assert pq.read_metadata(out / rel).num_rows == meta["rows"]
    for split in schema.SPLITS:
        table = split_table(out, split)
        assert table.num_rows == c[split]
        assert {f.name: str(f.type) for f in table.schema} == {k: v.replace("float32", "float")
                                                               for k, v in schema.RATING_COLUMNS.items()}
        labels = table["label"].to_numpy()
        assert m["positive_rate"][split] == pytest.approx(labels.mean(), abs=1e-6)
        assert set(np.unique(labels)) <= {0.0, 1.0}
        assert np.array_equal(labels, (table["rating"].to_numpy() >= 4).astype(np.float32))

    users, items = pq.read_table(out / schema.USERS_FILE), pq.read_table(out / schema.ITEMS_FILE)
    sizes = m["vocab_sizes"]
    assert users["user"].to_pylist() == list(range(1, sizes["user"]))
    assert items["item"].to_pylist() == list(range(1, sizes["item"]))
    assert m["item_features"] == ["item", "genres", "year"]
    has_users = layout in ("ml-100k", "ml-1m")
    assert m["user_features"] == (["user", "gender", "age", "occupation", "zip"] if has_users else ["user"])
    for name in m["user_features"][1:] + m["item_features"][1:]:
        assert sizes[name] == len(m["vocab"][name]) + 1
        col = (users if name in schema.USER_SIDE_FEATURES else items)[name]
        values = pa.compute.list_flatten(col) if name == "genres" else col
        assert 0 <= pa.compute.min(values).as_py() and pa.compute.max(values).as_py() < sizes[name]
    for split in schema.SPLITS:
        table = split_table(out, split)
        assert table["user"].to_numpy().min() >= 1 and table["user"].to_numpy().max() < sizes["user"]
        assert table["item"].to_numpy().min() >= 1 and table["item"].to_numpy().max() < sizes["item"]


def test_indices_map_back_to_raw_ids(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-1m")
    run(raw, tmp_path / "out")
    ratings = read_ratings(str(raw), layout_for("ml-1m"), "error", BadLineReport())
    users = pq.read_table(tmp_path / "out" / "users.parquet")["user_id"].to_numpy()
    items = pq.read_table(tmp_path / "out" / "items.parquet")["item_id"].to_numpy()
    t = pa.concat_tables([split_table(tmp_path / "out", s) for s in schema.SPLITS])
    got = set(zip(users[t["user"].to_numpy() - 1], items[t["item"].to_numpy() - 1], t["timestamp"].to_numpy()))
    assert got == set(zip(ratings.user_id, ratings.item_id, ratings.timestamp))


def test_side_features_match_the_raw_files(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-1m")
    m = run(raw, tmp_path / "out", zip_prefix=2)
    users = pq.read_table(tmp_path / "out" / "users.parquet").to_pylist()
    assert m["vocab"]["age"] == list(AGE_GROUPS) and m["vocab"]["gender"] == ["F", "M"]
    raw_users = [line.split("::") for line in (raw / "users.dat").read_text(encoding="latin-1").splitlines()]
    assert m["vocab"]["occupation"] == [str(o) for o in sorted({int(r[3]) for r in raw_users})]  # numeric order
    assert all(len(z) == 2 for z in m["vocab"]["zip"])
    line = (raw / "users.dat").read_text(encoding="latin-1").splitlines()[9].split("::")
    row = next(u for u in users if u["user_id"] == int(line[0]))
    expected = encode_user_features({"gender": line[1], "age": line[2], "occupation": line[3], "zip": line[4]},
                                    m["vocab"], 2)
    assert {k: row[k] for k in expected} == expected and all(v > 0 for v in expected.values())
    assert m["vocab"]["age"][row["age"] - 1] == int(line[2])

    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    line = (raw / "movies.dat").read_text(encoding="latin-1").splitlines()[4].split("::")
    item = next(i for i in items if i["item_id"] == int(line[0]))
    assert item["title"] == line[1]
    assert [m["vocab"]["genres"][g - 1] for g in item["genres"]] == line[2].split("|")
    assert m["vocab"]["year"][item["year"] - 1] == int(line[1][-5:-1])


def test_ml100k_ages_are_bucketed_like_ml1m(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-100k")
    m = run(raw, tmp_path / "out")
    users = {u["user_id"]: u for u in pq.read_table(tmp_path / "out" / "users.parquet").to_pylist()}
    for line in (raw / "u.user").read_text().splitlines()[:50]:
        uid, age = map(int, line.split("|")[:2])
        group = m["vocab"]["age"][users[uid]["age"] - 1]
        assert group <= age and (group == 56 or age < AGE_GROUPS[AGE_GROUPS.index(group) + 1])


def test_neutral_drop_and_threshold(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-1m")
    keep = run(raw, tmp_path / "keep")
    drop = run(raw, tmp_path / "drop", neutral="drop")
    threes = int((read_ratings(str(raw), layout_for("ml-1m"), "error", BadLineReport()).rating == 3).sum())
    assert threes > 0 and drop["counts"]["neutral_dropped"] == threes
    assert sum(drop["counts"][s] for s in schema.SPLITS) == 3000 - threes
    assert all(3 not in split_table(tmp_path / "drop", s)["rating"].to_pylist() for s in schema.SPLITS)
    assert drop["positive_rate"]["train"] > keep["positive_rate"]["train"]
    run(raw, tmp_path / "five", threshold=5.0)
    t = split_table(tmp_path / "five", "train")
    assert np.array_equal(t["label"].to_numpy(), (t["rating"].to_numpy() == 5).astype(np.float32))


def test_duplicates_keep_the_latest_and_are_counted(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    file = raw / "ratings.dat"
    first = file.read_text().splitlines()[0].split("::")
    u, i, ts = first[0], first[1], int(first[3])
    with open(file, "a") as f:
        f.write(f"{u}::{i}::1::{ts + 100}\n")   # later: wins over the original
        f.write(f"{u}::{i}::5::{ts - 100}\n")   # older: loses
        second = file.read_text().splitlines()[1].split("::")
        f.write(f"{second[0]}::{second[1]}::2::{second[3]}\n")  # same timestamp: the later line wins
    m = run(raw, tmp_path / "out")
    assert m["counts"]["duplicates"] == 3 and m["counts"]["raw_rows"] == 3003
    users = pq.read_table(tmp_path / "out" / "users.parquet")["user_id"].to_numpy()
    items = pq.read_table(tmp_path / "out" / "items.parquet")["item_id"].to_numpy()
    t = pa.concat_tables([split_table(tmp_path / "out", s) for s in schema.SPLITS]).to_pandas()
    t["u"], t["i"] = users[t["user"] - 1], items[t["item"] - 1]
    assert len(t) == 3000 and not t.duplicated(["u", "i"]).any()
    row = t[(t.u == int(u)) & (t.i == int(i))].iloc[0]
    assert (row.rating, row.timestamp) == (1.0, ts + 100)
    row = t[(t.u == int(second[0])) & (t.i == int(second[1]))].iloc[0]
    assert row.rating == 2.0


def test_skip_mode_counts_everything_and_error_mode_stops(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    with open(raw / "ratings.dat", "ab") as f:
        f.write(b"1::2::3\n1::2::11::978300760\n99999::1::4::978300760\n")  # user 99999 not in users.dat
    lines = (raw / "movies.dat").read_text(encoding="latin-1").splitlines()
    dropped_movie = int(lines[0].split("::")[0])
    (raw / "movies.dat").write_text("\n".join(lines[1:]) + "\n", encoding="latin-1")
    with pytest.raises(DataValidationError, match=r"ratings.dat:3001: "):
        run(raw, tmp_path / "err")
    assert not (tmp_path / "err" / "manifest.json").exists()
    m = run(raw, tmp_path / "out", on_bad_lines="skip")
    c = m["counts"]
    assert c["skipped"] == {"ratings.bad_rating": 1, "ratings.wrong_field_count": 1}
    assert c["raw_rows"] == 3003 and c["train"] + c["val"] + c["test"] == 3001
    rated = read_ratings(str(raw), layout_for("ml-1m"), "skip", BadLineReport())
    assert c["ratings_item_not_in_movies"] == int((rated.item_id == dropped_movie).sum()) > 0
    assert c["items_not_in_movies"] == 1 and c["ratings_user_not_in_users"] == 1
    assert c["users_not_in_users_file"] == 1
    items = pq.read_table(tmp_path / "out" / "items.parquet").to_pylist()
    orphan = next(i for i in items if i["item_id"] == dropped_movie)
    assert orphan["genres"] == [] and orphan["year"] == 0 and orphan["title"] == ""


@pytest.mark.parametrize("split", ["random", "temporal"])
def test_same_inputs_same_bytes(split, synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-10m")
    a = run(raw, tmp_path / "a", split=split, seed=5)
    b = run(raw, tmp_path / "b", split=split, seed=5)
    assert {k: v["sha256"] for k, v in a["files"].items()} == {k: v["sha256"] for k, v in b["files"].items()}
    c = run(raw, tmp_path / "c", split=split, seed=6)
    shards = [k for k in a["files"] if k.startswith("train/")]
    assert any(a["files"][k]["sha256"] != c["files"][k]["sha256"] for k in shards)  # the seed matters
    assert {k: v["sha256"] for k, v in a["files"].items() if "parquet" in k and "/" not in k} == \
        {k: v["sha256"] for k, v in c["files"].items() if "parquet" in k and "/" not in k}  # side tables don't


def test_temporal_split_in_prepared_output(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-1m")
    run(raw, tmp_path / "out", split="temporal")
    frames = {s: split_table(tmp_path / "out", s).to_pandas() for s in schema.SPLITS}
    last_train = frames["train"].groupby("user")["timestamp"].max()
    val, test = frames["val"].set_index("user")["timestamp"], frames["test"].set_index("user")["timestamp"]
    assert val.index.is_unique and test.index.is_unique and len(test) == len(last_train)
    assert (test.sort_index() >= val.sort_index()).all()
    assert (val.sort_index() >= last_train.loc[val.index].sort_index()).all()


def test_shard_counts(synthetic_movielens, tmp_path):
    raw = synthetic_movielens("ml-1m")
    m = prepare_dataset(PrepareConfig(data_dir=str(raw), shard_rows=1000, min_shards=2), str(tmp_path / "o"),
                        log=lambda _: None)
    n = {s: sum(1 for k in m["files"] if k.startswith(s + "/")) for s in schema.SPLITS}
    assert n == {"train": max(2, -(-m["counts"]["train"] // 1000)), "val": 2, "test": 2}
    rows = [m["files"][f"train/part-{k:05d}.parquet"]["rows"] for k in range(n["train"])]
    assert max(rows) <= 1000 and max(rows) - min(rows) <= 1


def test_rerun_is_a_noop_and_changes_are_not(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    logs = []
    cfg = PrepareConfig(data_dir=str(raw), min_shards=2)
    first = prepare_dataset(cfg, str(tmp_path / "out"), log=logs.append)
    mtime = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    logs.clear()
    again = prepare_dataset(cfg, str(tmp_path / "out"), log=logs.append)
    assert again == first and any("skipped" in line for line in logs)
    assert (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == mtime
    # another option -> redone
    changed = prepare_dataset(dataclasses.replace(cfg, test_fraction=0.2), str(tmp_path / "out"), log=logs.append)
    assert changed["counts"]["test"] > first["counts"]["test"]
    # changed input bytes -> redone
    with open(raw / "ratings.dat", "a") as f:
        f.write("1::1::5::978300760\n" if "1::1::" not in (raw / "ratings.dat").read_text() else "")
    (raw / "users.dat").write_text((raw / "users.dat").read_text() + "\n".join([]))
    text = (raw / "movies.dat").read_text(encoding="latin-1").replace("Synthetic", "Renamed", 1)
    (raw / "movies.dat").write_text(text, encoding="latin-1")
    redone = prepare_dataset(dataclasses.replace(cfg, test_fraction=0.2), str(tmp_path / "out"), log=logs.append)
    assert redone["source"]["files"] != changed["source"]["files"]


def test_interrupted_prepare_leaves_no_manifest(movielens_copy, tmp_path, monkeypatch):
    raw = movielens_copy("ml-1m")
    out = tmp_path / "out"
    run(raw, out)
    assert is_prepared(str(out))
    from twotower_lit.data import storage

    def crash(self, rel, table):
        raise KeyboardInterrupt("simulated crash while writing shards")

    monkeypatch.setattr(storage.Storage, "write_parquet", crash)
    with pytest.raises(KeyboardInterrupt):
        run(raw, out, seed=1)
    assert not (out / "manifest.json").exists() and not is_prepared(str(out))
    with pytest.raises(FileNotFoundError, match="entrypoints.prepare"):
        read_manifest(str(out))


def test_entrypoint_synthetic_end_to_end(tmp_path):
    out = tmp_path / "syn"
    cmd = [sys.executable, "-m", "entrypoints.prepare", "--synthetic", "5000", "--synthetic-layout", "ml-100k",
           "--output-dir", str(out), "--min-shards", "2", "--split", "temporal"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert "train" in first.stdout and (out / "raw" / "u.data").exists()
    m = read_manifest(str(out))
    assert m["source"]["kind"] == "synthetic" and m["options"]["split"] == "temporal"
    assert m["counts"]["raw_rows"] == 5000 and m["dataset"] == "ml-100k"
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert second.returncode == 0 and "skipped" in second.stdout


def test_entrypoint_reports_bad_lines_without_traceback(movielens_copy, tmp_path):
    raw = movielens_copy("ml-100k")
    with open(raw / "u.data", "a") as f:
        f.write("1\t2\tfive\t881250949\n")
    cmd = [sys.executable, "-m", "entrypoints.prepare", "--data-dir", str(raw), "--output-dir", str(tmp_path / "o")]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{raw / 'u.data'}:3001: field 'rating'" in res.stderr
    res = subprocess.run(cmd + ["--on-bad-lines", "skip"], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0 and "ratings.bad_rating 1" in res.stdout


def test_s3_output_against_moto_server(moto_server, synthetic_movielens, monkeypatch):
    import boto3
    import pyarrow.fs as pafs

    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    boto3.client("s3", endpoint_url=moto_server).create_bucket(Bucket="prepared")
    raw = synthetic_movielens("ml-1m")
    uri = "s3://prepared/movielens/ml-1m"
    assert not is_prepared(uri)
    m = prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=2), uri, log=lambda _: None)
    assert is_prepared(uri) and read_manifest(uri) == m
    s3 = boto3.client("s3", endpoint_url=moto_server)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="prepared", Prefix="movielens/ml-1m/")["Contents"]}
    assert keys == {f"movielens/ml-1m/{rel}" for rel in m["files"]} | {"movielens/ml-1m/manifest.json"}
    body = s3.get_object(Bucket="prepared", Key="movielens/ml-1m/train/part-00000.parquet")["Body"].read()
    assert hashlib.sha256(body).hexdigest() == m["files"]["train/part-00000.parquet"]["sha256"]
    fs = pafs.S3FileSystem(endpoint_override=moto_server.split("//")[1], scheme="http", region="us-east-1")
    assert pq.read_table("prepared/movielens/ml-1m/val/part-00001.parquet", filesystem=fs).num_rows == \
        m["files"]["val/part-00001.parquet"]["rows"]
    logs = []
    prepare_dataset(PrepareConfig(data_dir=str(raw), min_shards=2), uri, log=logs.append)
    assert any("skipped" in line for line in logs)


def test_a_failing_rerun_keeps_the_previous_output(movielens_copy, tmp_path):
    raw = movielens_copy("ml-1m")
    out = tmp_path / "out"
    first = run(raw, out)
    with open(raw / "ratings.dat", "a") as f:
        f.write("1::2::3\n")
    with pytest.raises(DataValidationError):
        run(raw, out)  # input changed and is now invalid: nothing is replaced
    assert read_manifest(str(out)) == first
    assert all(hashlib.sha256((out / rel).read_bytes()).hexdigest() == meta["sha256"]
               for rel, meta in first["files"].items())
