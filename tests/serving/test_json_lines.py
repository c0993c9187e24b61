"""JSON-lines bodies (what a SageMaker Batch Transform sends with SplitType=Line and
BatchStrategy=MultiRecord): one request per line, answered line for line with what each line
alone gets, through the real HTTP server and through SageMaker's inference toolkit."""
import json

import httpx

from tests.serving.test_inference_contract import _package, _transform

LINES = ['{"user_id": 3, "k": 4}', '{"user_id": 12345}', "",
         '{"user_id": 99999, "user_features": {"gender": "F", "age": 25}, "k": 3}',
         '{"inputs": [5, 6], "k": 4, "exclude_seen": false}', '{"user_id": 7, "k": 4}']
JSONL = {"Content-Type": "application/jsonlines"}


def _single_answers(url):
    return [httpx.post(url + "/invocations", content=line, headers={"Content-Type": "application/json"},
                       timeout=30).json() for line in LINES if line]


def test_each_line_gets_what_it_gets_alone(server):
    body = "\n".join(LINES) + "\n"
    r = httpx.post(server.url + "/invocations", content=body, headers=JSONL, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/jsonlines")
    answers = [json.loads(line) for line in r.text.splitlines()]
    assert answers == _single_answers(server.url)  # the blank line gets no answer line
    assert [p["source"] for a in answers for p in a["predictions"]] == \
        ["model", "popularity", "cold_start", "model", "model", "model"]
    assert [len(a["predictions"][0]["items"]) for a in answers] == [4, 10, 3, 4, 4]


def test_a_bad_line_is_refused_naming_the_line(server):
    body = '{"user_id": 3}\n{"user_id": "x"}\n'
    r = httpx.post(server.url + "/invocations", content=body, headers=JSONL, timeout=30)
    assert r.status_code == 400
    assert r.json()["error"]["field"] == "line 2.user_id"
    r = httpx.post(server.url + "/invocations", content='{"user_id": 3}\n{"user_id": \n', headers=JSONL, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["field"] == "line 2"
    r = httpx.post(server.url + "/invocations", content="\n\n", headers=JSONL, timeout=30)
    assert r.status_code == 400 and "no JSON lines" in r.json()["error"]["message"]


def test_the_user_limit_counts_every_line(start_server, model_dir):
    s = start_server(["--model-dir", model_dir, "--max-batch", "3"])
    ok = httpx.post(s.url + "/invocations", content='{"inputs": [1, 2]}\n{"user_id": 3}\n', headers=JSONL, timeout=30)
    assert ok.status_code == 200 and len(ok.text.splitlines()) == 2
    over = httpx.post(s.url + "/invocations", content='{"inputs": [1, 2]}\n{"inputs": [3, 4]}\n', headers=JSONL,
                      timeout=30)
    assert over.status_code == 400 and "line 2" in over.json()["error"]["message"]


def test_the_inference_toolkit_serves_json_lines(model_dir, tmp_path, server):
    root = _package(model_dir, tmp_path)
    body = "\n".join(LINES)
    out = _transform(root, tmp_path, [(body, {"Content-Type": "application/jsonlines"}),
                                      (body, {"Content-Type": "application/jsonlines", "Accept": "application/json"}),
                                      ('{"user_id": 1}\n{"k": 0}', {"Content-Type": "application/jsonlines"})])
    first, second, bad = out["results"]
    expected = _single_answers(server.url)
    for res in (first, second):
        assert res["status"] == 200 and res["content_type"] == "application/jsonlines", res
        assert [json.loads(line) for line in res["body"].splitlines()] == expected
    assert bad["status"] == 400 and json.loads(bad["body"])["error"]["field"] == "line 2.k"
