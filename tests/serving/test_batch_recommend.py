"""entrypoints.recommend: offline top-k from the export, the endpoint's answers for the same users,
cold starts from a users file, Parquet locally and on S3 (moto), refusals that name the line."""
import json
import subprocess
import sys

import boto3
import httpx
import pyarrow.parquet as pq
import pytest

from tests.serving.conftest import NUM_USERS, REPO
from twotower_lit.batch import RecommendConfig, read_recommendations, recommend


def _by_user(table):
    out = {}
    for row in table.to_pylist():
        out.setdefault(row["user_id"], []).append(row)
    return out


def _endpoint(url, body):
    r = httpx.post(url + "/invocations", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def test_every_user_gets_the_endpoints_answer(model_dir, server, tmp_path):
    out = tmp_path / "recs.parquet"
    proc = subprocess.run([sys.executable, "-m", "entrypoints.recommend", "--model-dir", model_dir, "--output",
                           str(out), "--k", "15", "--batch-users", "16"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout)
    assert summary["users"] == NUM_USERS and summary["by_source"]["model"] == NUM_USERS
    assert "recommend: 100%" in proc.stderr  # the progress bar
    table, meta = read_recommendations(str(out))
    assert table.column_names == ["user_id", "rank", "item_id", "score", "title", "source"]
    assert table.num_rows == summary["rows"] == NUM_USERS * 15
    assert pq.ParquetFile(out).num_row_groups == -(-NUM_USERS // 16)  # one row group per chunk of users
    assert meta["k"] == 15 and meta["model_version"] == summary["model_version"]
    rows = _by_user(table)
    assert sorted(rows) == list(range(1, NUM_USERS + 1))
    for user in (1, 2, 17, 33, NUM_USERS):  # sampled users, against the real HTTP endpoint
        (pred,) = _endpoint(server.url, {"user_id": user, "k": 15})
        mine = rows[user]
        assert [r["rank"] for r in mine] == list(range(1, 16))
        assert [r["item_id"] for r in mine] == [i["id"] for i in pred["items"]]
        assert [r["title"] for r in mine] == [i["title"] for i in pred["items"]]
        assert [r["score"] for r in mine] == pytest.approx([i["score"] for i in pred["items"]], abs=2e-6)
        assert {r["source"] for r in mine} == {pred["source"]}


def test_a_users_file_with_cold_starts_and_seen_items_kept(model_dir, server, tmp_path):
    users = tmp_path / "users.jsonl"
    users.write_text("# ids and endpoint-style JSON lines\n3\n\n"
                     '{"user_id": 424242, "user_features": {"gender": "F", "age": 25, "occupation": 3}}\n'
                     '{"user_id": 777}\n')
    out = tmp_path / "recs.parquet"
    summary = recommend(RecommendConfig(model_dir=model_dir, output=str(out), users=str(users), k=5,
                                        exclude_seen=False, progress=False))
    assert summary["by_source"] == {"model": 1, "cold_start": 1, "popularity": 1}
    rows = _by_user(read_recommendations(str(out))[0])
    assert list(rows) == [3, 424242, 777]
    expected = _endpoint(server.url, {"inputs": [3, {"user_id": 424242, "user_features": {
        "gender": "F", "age": 25, "occupation": 3}}, 777], "k": 5, "exclude_seen": False})
    for pred in expected:
        assert [r["item_id"] for r in rows[pred["user_id"]]] == [i["id"] for i in pred["items"]]
        assert rows[pred["user_id"]][0]["source"] == pred["source"]


def test_output_to_s3(model_dir, moto_server, tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_server)
    s3 = boto3.client("s3", endpoint_url=moto_server, region_name="us-east-1")
    s3.create_bucket(Bucket="recs")
    summary = recommend(RecommendConfig(model_dir=model_dir, output="s3://recs/batch/recs.parquet", k=3,
                                        progress=False))
    local = tmp_path / "recs.parquet"
    s3.download_file("recs", "batch/recs.parquet", str(local))
    table, meta = read_recommendations(str(local))
    assert table.num_rows == summary["rows"] == NUM_USERS * 3 and meta["k"] == 3
    assert read_recommendations("s3://recs/batch/recs.parquet")[0].equals(table)


@pytest.mark.parametrize("line, message", [
    ("abc", "users.txt:2: expected a raw user id or a JSON object"),
    ('{"user_features": {"gender": "F"}}', "users.txt:2: no user_id"),
    ('{"user_id": "x"}', "users.txt:2: user_id: expected an integer"),
    ('{"inputs": [1, 2]}', "users.txt:2: one user per line"),
])
def test_a_bad_users_file_is_refused_naming_the_line(model_dir, tmp_path, capsys, line, message):
    from entrypoints.recommend import main

    users = tmp_path / "users.txt"
    users.write_text(f"1\n{line}\n")
    out = tmp_path / "recs.parquet"
    assert main(["--model-dir", model_dir, "--output", str(out), "--users", str(users), "--progress", "false"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.glob("recs.parquet.tmp-*"))


def test_an_index_of_the_export_gives_the_endpoints_approximate_answers(model_dir, start_server, tmp_path, capsys):
    import shutil

    from entrypoints.index import main as build_index
    from entrypoints.recommend import main

    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    assert build_index(["--model-dir", str(model), "--index", "hnsw"]) == 0
    server = start_server(["--model-dir", str(model), "--search", "faiss"])
    out = tmp_path / "recs.parquet"
    summary = recommend(RecommendConfig(model_dir=str(model), output=str(out), k=10, search="faiss", progress=False))
    assert summary["search"] == "faiss"
    rows = _by_user(read_recommendations(str(out))[0])
    for user in (1, 9, 27, NUM_USERS):
        (pred,) = _endpoint(server.url, {"user_id": user, "k": 10})
        assert [r["item_id"] for r in rows[user]] == [i["id"] for i in pred["items"]], user
    capsys.readouterr()
    assert main(["--model-dir", str(model), "--output", str(tmp_path / "x.parquet"), "--search", "ivf",
                 "--progress", "false"]) == 2
    assert "no 'ivf' index" in capsys.readouterr().err
