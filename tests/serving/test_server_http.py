"""The real server (a subprocess on 127.0.0.1): valid requests and every class of bad input (the
hostile mass of them, with a shadow and capture, is test_adversarial.py)."""
import asyncio
import json
import time

import httpx
import pytest

from twotower_lit.export.format import load_export

JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def exported(model_dir):
    return load_export(model_dir)


def post(server, body, headers=JSON):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(server.url + "/invocations", content=data, headers=headers, timeout=30)


def test_ping(server, exported):
    r = httpx.get(server.url + "/ping")
    body = r.json()
    assert r.status_code == 200 and body["status"] == "healthy" and body["model_version"] == exported.model_version
    assert body["search"]["kind"] == "exact"  # the export has no index: exact search answers


def test_single_user(server, exported):
    r = post(server, {"user_id": 5, "k": 7}, {**JSON, "X-Amzn-SageMaker-Inference-Id": "abc-1"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/json"
    assert r.headers["x-amzn-sagemaker-inference-id"] == "abc-1"
    body = r.json()
    assert body["model_version"] == exported.model_version
    (pred,) = body["predictions"]
    assert pred["user_id"] == 5 and pred["source"] == "model" and len(pred["items"]) == 7
    scores = [it["score"] for it in pred["items"]]
    assert scores == sorted(scores, reverse=True)
    by_id = {it["id"]: it for it in exported.items}
    for it in pred["items"]:
        assert by_id[it["id"]]["title"] == it["title"] and by_id[it["id"]]["genres"] == it["genres"]


def test_batch_default_k_and_unknown_user(server):
    r = post(server, {"inputs": [1, 2, 3, 424242]})
    assert r.status_code == 200
    preds = r.json()["predictions"]
    assert [p["user_id"] for p in preds] == [1, 2, 3, 424242]
    assert [p["source"] for p in preds] == ["model"] * 3 + ["popularity"]
    assert all(len(p["items"]) == 10 for p in preds)
    assert preds[3]["fallback_reason"]


def test_cold_start(server, exported):
    zip_code = exported.vocab["zip"][0] + "12"
    r = post(server, {"user_features": {"gender": "F", "age": 25, "occupation": 4, "zip": zip_code}, "k": 5})
    (pred,) = r.json()["predictions"]
    assert r.status_code == 200 and pred["source"] == "cold_start" and pred["user_id"] is None
    assert len(pred["items"]) == 5


def test_seen_items_are_excluded(server, exported):
    index = exported.user_index()[9]
    seen_ids = {exported.items[j - 1]["id"] for j in exported.seen(index).tolist()}
    k = exported.num_items
    got = {it["id"] for it in post(server, {"user_id": 9, "k": 100}).json()["predictions"][0]["items"]}
    assert len(got) == 100 and not got & seen_ids
    everything = post(server, {"user_id": 9, "k": 100, "exclude_seen": False}).json()["predictions"][0]["items"]
    assert k > 100 and len(everything) == 100
    assert {it["id"] for it in everything} & seen_ids, "without exclusion, top-100 of 200 includes seen items"


@pytest.mark.parametrize("feature", ["age", "occupation"])
@pytest.mark.parametrize("value", ["inf", "-inf", "Infinity", "1e999", "nan", "NaN"])
def test_non_finite_numbers_in_features_are_400_naming_the_field(server, feature, value):
    for doc, field in (({"user_features": {feature: value}}, f"user_features.{feature}"),
                       ({"inputs": [3, {"user_id": 777777, "user_features": {"gender": "F", feature: value}}]},
                        f"inputs[1].user_features.{feature}")):
        r = post(server, doc)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["field"] == field
    assert post(server, {"user_features": {feature: "25"}}).status_code == 200


def test_csv(server):
    r = post(server, "4\n8\n", {"Content-Type": "text/csv"})
    assert r.status_code == 200 and [p["user_id"] for p in r.json()["predictions"]] == [4, 8]


@pytest.mark.parametrize("method,path,body,headers,status,field", [
    ("POST", "/invocations", b"{not json", JSON, 400, "body"),
    ("POST", "/invocations", b'{"user_id": "5"}', JSON, 400, "user_id"),
    ("POST", "/invocations", b'{"inputs": [1, [2]]}', JSON, 400, "inputs[1]"),
    ("POST", "/invocations", b'{"user_id": 5, "k": 0}', JSON, 400, "k"),
    ("POST", "/invocations", b'{"user_id": 5, "k": 101}', JSON, 400, "k"),
    ("POST", "/invocations", b'{"user_id": 5, "exclude_seen": 1}', JSON, 400, "exclude_seen"),
    ("POST", "/invocations", b'{"user_id": 5, "user_features": {"shoe": 4}}', JSON, 400, "user_features.shoe"),
    ("POST", "/invocations", b'{"user_id": 5}', {"Content-Type": "application/xml"}, 415, "Content-Type"),
    ("POST", "/invocations", b'{"user_id": 5}', {}, 415, "Content-Type"),
    ("POST", "/invocations", b'{"user_id": 5}', {**JSON, "Accept": "text/html"}, 406, "Accept"),
    ("POST", "/invocations", b"x" * 70000, JSON, 413, "body"),
    ("GET", "/invocations", None, {}, 405, "method"),
    ("POST", "/ping", b"", {}, 405, "method"),
    ("GET", "/nowhere", None, {}, 404, "path"),
])
def test_client_errors_are_4xx_json_naming_the_field(server, method, path, body, headers, status, field):
    r = httpx.request(method, server.url + path, content=body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"]["field"] == field


def test_oversized_chunked_body_is_413(server):
    def chunks():
        for _ in range(20):
            yield b"[" * 8192

    r = httpx.post(server.url + "/invocations", content=chunks(), headers=JSON, timeout=30)
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_an_over_limit_body_still_being_sent_gets_its_413(server):
    """The server answers 413 before the body is in; closing at once would make the kernel reset
    the connection over the unread bytes and destroy the answer: it must reach the client."""

    async def send_too_much(chunked: bool):
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        size = 4 * 1024 * 1024
        framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % size
        writer.write(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s\r\n\r\n" % framing)
        answer = asyncio.ensure_future(reader.read())
        piece = b"[" * 65536
        for _ in range(size // len(piece)):
            if answer.done():
                break
            try:
                writer.write(b"10000\r\n" + piece + b"\r\n" if chunked else piece)
                await writer.drain()
            except ConnectionError:
                break
        try:
            data = await asyncio.wait_for(answer, 10)
        finally:
            writer.close()
        return data

    for chunked in (False, True, False, True):
        data = asyncio.run(send_too_much(chunked))
        assert data.startswith(b"HTTP/1.1 413 "), data[:200]
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["field"] == "body"


def test_sync_sender_drives_the_load_loop(server):
    """The pluggable sender: a blocking call (as boto3's invoke_endpoint would be) in the load loop."""
    from twotower_lit.serving.load import payloads, run_load, sync_sender

    def invoke(body, content_type):
        return httpx.post(server.url + "/invocations", content=body, headers={"Content-Type": content_type}).status_code

    result = asyncio.run(run_load(sync_sender(invoke), payloads([1, 2, 3, 999], 2, 5, 0), rate=200, concurrency=2,
                                  max_requests=20, duration=30))
    summary = result.summary()
    assert summary["requests"] == 20 and summary["ok"] == 20 and summary["statuses"] == {"200": 20}


def test_slow_body_upload_times_out_with_408(server):
    """The module's server has a 2 s body timeout."""

    async def trickle():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{")
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 10)
        writer.close()
        return int(status.split()[1])

    t0 = time.perf_counter()
    assert asyncio.run(trickle()) == 408
    assert 1.5 < time.perf_counter() - t0 < 8
    assert post(server, {"user_id": 1}).status_code == 200


def test_load_cli_against_the_server(server, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "load.json"
    proc = subprocess.run([sys.executable, "-m", "entrypoints.load", "--url", server.url + "/invocations",
                           "--user-ids", "1,2,3,77777", "--rate", "100", "--concurrency", "2", "--requests", "30",
                           "--batch", "2", "--output", str(out)], cwd=repo, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "30 requests in" in proc.stdout and "p99" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["ok"] == 30 and summary["users"] == 4 and 0 < summary["achieved_rps"] <= 150
