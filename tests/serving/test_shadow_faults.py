"""A hanging or crashing shadow variant never delays or breaks production, and every request and
every shadow outcome is in data capture after SIGTERM."""
import asyncio
import json
import time

import httpx
import pytest

from tests.serving.conftest import capture_lines

N_REQUESTS = 40
SHADOW_TIMEOUT = 2.0


async def _send_all(url: str, n: int, concurrency: int = 4):
    results = []
    pending = iter(range(n))

    async def worker():
        async with httpx.AsyncClient(timeout=30) as client:
            for i in pending:
                t0 = time.perf_counter()
                r = await client.post(url + "/invocations", json={"user_id": 1 + i % 50, "k": 5})
                results.append((r.status_code, time.perf_counter() - t0, r.json()))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


@pytest.mark.parametrize("fault", ["hang", "crash"])
def test_faulty_shadow_causes_no_production_errors(fault, model_dir, shadow_model_dir, start_server, tmp_path):
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", shadow_model_dir,
                           "--shadow-timeout", str(SHADOW_TIMEOUT), "--shadow-max-in-flight", "64",
                           "--capture-dir", str(capture)],
                          env={"TWOTOWER_FAULT_INJECTION": f"shadow={fault}"})
    results = asyncio.run(_send_all(server.url, N_REQUESTS))
    statuses = [s for s, _, _ in results]
    latencies = sorted(t for _, t, _ in results)
    assert statuses == [200] * N_REQUESTS, server.log()[-3000:]
    # production never waits for the shadow: a hung shadow call takes SHADOW_TIMEOUT
    assert latencies[-1] < SHADOW_TIMEOUT / 2, latencies
    assert {body["predictions"][0]["source"] for _, _, body in results} == {"model"}
    assert server.alive() and httpx.get(server.url + "/ping").status_code == 200

    t0 = time.perf_counter()
    assert server.stop() == 0
    assert time.perf_counter() - t0 < SHADOW_TIMEOUT + 15, "shutdown waits for shadow calls at most their timeout"
    production = [json.loads(line) for line in capture_lines(capture, "production")]
    shadow = [json.loads(line) for line in capture_lines(capture, "shadow")]
    assert len(production) == N_REQUESTS and len(shadow) == N_REQUESTS
    assert {r["eventMetadata"]["eventId"] for r in production} == {r["eventMetadata"]["eventId"] for r in shadow}
    assert all(r["eventMetadata"]["customAttributes"]["statusCode"] == 200 for r in production)
    shadow_status = [r["eventMetadata"]["customAttributes"]["statusCode"] for r in shadow]
    assert all(s == 0 or s >= 500 for s in shadow_status), shadow_status
    errors = [r["eventMetadata"]["customAttributes"].get("error", "") for r in shadow]
    if fault == "hang":
        assert all(e.startswith("timeout") for e in errors), errors
    else:
        assert "exited" in server.log(), "the supervisor noticed the crash"


def test_shadow_sampling_percent():
    from twotower_lit.config import ServeConfig
    from twotower_lit.serving.shadow import ShadowMirror

    def share(percent):
        mirror = ShadowMirror("http://127.0.0.1:9", ServeConfig(shadow_sampling_percent=percent))
        return sum(mirror.sampled() for _ in range(4000)) / 4000

    assert share(0) == 0 and share(100) == 1 and 0.2 < share(25) < 0.3


def test_timeouts_overload_and_graceful_shutdown(model_dir, start_server, tmp_path):
    """A slow model (1 s per call, one call at a time): within max_concurrency and request_timeout
    a request is served, past the timeout it gets 504, past max_concurrency 503; a request in
    flight at SIGTERM is still answered and captured."""
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--request-timeout", "1.5", "--max-concurrency", "4",
                           "--capture-dir", str(capture)], env={"TWOTOWER_FAULT_INJECTION": "production=sleep:1"})

    async def burst(n):
        async with httpx.AsyncClient(timeout=30) as client:
            rs = await asyncio.gather(*(client.post(server.url + "/invocations", json={"user_id": 1})
                                        for _ in range(n)))
        return rs

    responses = asyncio.run(burst(5))
    assert sorted(r.status_code for r in responses) == [200, 503, 504, 504, 504], [r.text for r in responses]
    assert {r.json()["error"]["field"] for r in responses if r.status_code != 200} == {"server"}
    assert httpx.get(server.url + "/ping").status_code == 200
    time.sleep(2.0)  # let the abandoned 1 s call finish

    async def in_flight_at_sigterm():
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.ensure_future(client.post(server.url + "/invocations", json={"user_id": 2}))
            await asyncio.sleep(0.3)
            server.proc.send_signal(15)
            return await pending

    r = asyncio.run(in_flight_at_sigterm())
    assert r.status_code == 200 and r.json()["predictions"][0]["user_id"] == 2
    assert server.stop() == 0
    statuses = sorted(json.loads(line)["eventMetadata"]["customAttributes"]["statusCode"]
                      for line in capture_lines(capture, "production"))
    assert statuses == [200, 200, 503, 504, 504, 504]


def test_shadow_death_just_before_shutdown_is_still_reported_once(shadow_model_dir, caplog):
    """The supervisor looks at its child every 0.5 s; a child that dies right before shutdown
    (the watcher has not looked yet, or has) is reported exactly once either way."""
    import logging
    import os

    from twotower_lit.config import ServeConfig
    from twotower_lit.serving.shadow import ShadowProcess

    shadow = ShadowProcess(ServeConfig(shadow_model_dir=shadow_model_dir, log_level="warning")).start()
    with caplog.at_level(logging.ERROR, logger="twotower_lit.serving.shadow"):
        shadow.proc.kill()
        shadow.proc.wait()
        shadow.stop()
    exits = [r.getMessage() for r in caplog.records if "exited with code" in r.getMessage()]
    assert len(exits) == 1 and "-9" in exits[0], exits
    assert not os.path.exists(shadow.socket)  # and stop() still cleaned up


def test_non_ascii_headers_reach_the_shadow_and_both_records_are_written(model_dir, shadow_model_dir, start_server,
                                                                          tmp_path):
    """Header values are bytes on the wire (latin-1 to Starlette): the mirror must send them on as
    they came; a call that fails still leaves the shadow's record."""
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", shadow_model_dir,
                           "--capture-dir", str(capture)])
    cases = [{"X-Amzn-SageMaker-Inference-Id": "caf\u00e9-\u2603".encode("utf-8")},
             {"X-Amzn-SageMaker-Inference-Id": b"id-\xe9\xff"},
             {"Content-Type": "application/json; charset=\u00e9".encode("utf-8")},
             {"Accept": b"application/json, text/\xe9"}]
    for headers in cases:
        r = httpx.post(server.url + "/invocations", content=b'{"user_id": 4, "k": 2}',
                       headers={"Content-Type": "application/json", **headers}, timeout=10)
        assert r.status_code == 200, r.text
    assert server.stop() == 0
    production = [json.loads(line) for line in capture_lines(capture, "production")]
    shadow = [json.loads(line) for line in capture_lines(capture, "shadow")]
    assert len(production) == len(shadow) == len(cases), server.log()[-3000:]
    assert {r["eventMetadata"]["eventId"] for r in production} == {r["eventMetadata"]["eventId"] for r in shadow}
    assert [r["eventMetadata"]["customAttributes"]["statusCode"] for r in shadow] == [200] * len(cases)
    ids = {r["eventMetadata"]["inferenceId"] for r in shadow}
    assert "caf\u00e9-\u2603".encode("utf-8").decode("latin-1") in ids and "id-\xe9\xff" in ids
    assert "Task exception was never retrieved" not in server.log()


def test_a_shadow_that_cannot_start_leaves_production_serving(model_dir, shadow_model_dir, start_server, tmp_path):
    """A corrupt shadow model: production starts and answers every request; the shadow's failure is
    in the log, in /ping's body and in each shadow record of data capture."""
    import shutil

    broken = tmp_path / "broken-shadow"
    shutil.copytree(shadow_model_dir, broken)
    weights = broken / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", str(broken), "--capture-dir", str(capture)])
    deadline = time.monotonic() + 20
    while True:
        ping = httpx.get(server.url + "/ping", timeout=1)
        assert ping.status_code == 200
        shadow_state = ping.json()["shadow"]
        if shadow_state["status"] == "unavailable" and "exited with code" in shadow_state.get("error", ""):
            break
        assert time.monotonic() < deadline, shadow_state
        time.sleep(0.2)
    assert ping.json()["status"] == "healthy" and str(broken) in shadow_state["error"]
    results = asyncio.run(_send_all(server.url, 10))
    assert [s for s, _, _ in results] == [200] * 10
    assert server.stop() == 0
    log = server.log()
    assert "model.safetensors" in log and "exited with code" in log  # the child's reason, the supervisor's note
    production = [json.loads(line) for line in capture_lines(capture, "production")]
    shadow = [json.loads(line) for line in capture_lines(capture, "shadow")]
    assert len(production) == len(shadow) == 10
    for record in shadow:
        attrs = record["eventMetadata"]["customAttributes"]
        assert attrs["statusCode"] == 0 and attrs["error"].startswith("shadow unavailable: "), attrs
        assert str(broken) in attrs["error"]
