"""Adversarial suite: over 10,000 malformed or hostile requests against the real server (a
subprocess) with a shadow variant and data capture on.

Random bytes, mutated and deeply nested JSON, NaN/Infinity and huge numbers, wrong types, unicode
in bodies and in header values, other routes, bodies of several MB (under and over the limit,
declared and chunked), slow bodies, slow and silent request heads, broken HTTP framing, and a
burst of 500 requests on 500 connections at once, while other clients keep sending. Throughout, a
pinger on its own thread times every /ping. Afterwards: no answer was a 5xx, every ping was
answered within 1 s, the server stopped cleanly, and both variants' capture files are valid JSON
lines holding exactly one record per request whose body the server received whole (by inference
id). Every generator is seeded.
"""
import asyncio
import http.client
import json
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import List, Optional, Tuple

from tests.serving.conftest import capture_files, trickle

SEED = 20261207
KEEPALIVE_REQUESTS = 9_400
BURST = 500
CONNECTIONS = 8
HEADER_TIMEOUT = BODY_TIMEOUT = 1.0
KEEP_ALIVE = 3
MAX_BODY = 6 * 1024 * 1024  # the server's default --max-body-bytes
SLACK = 3.0
ID = b"X-Amzn-SageMaker-Inference-Id"


@dataclass
class Sent:
    raw: bytes                  # the request as written on the wire
    inference_id: Optional[str]  # what both variants must capture it under; None: captured by neither


def _json(doc) -> bytes:
    # raw UTF-8, and a lone surrogate as the invalid bytes it becomes
    return json.dumps(doc, ensure_ascii=False).encode("utf-8", "surrogatepass")


def _body(rng: random.Random) -> bytes:
    """A request body: mostly malformed or hostile, some valid."""
    valid = [b'{"user_id": 3}', b'{"inputs": [1, 2], "k": 5}', b'{"user_features": {"age": 25, "gender": "F"}}',
             b'{"inputs": [7, {"user_id": 424242, "user_features": {"occupation": "4", "zip": "55455"}}]}']
    values = [None, True, -1, 0, 2 ** 63, -(2 ** 63) - 1, 2 ** 63 - 1, 1e308, 1.5, "1", "", [], {}, [[[]]], "\u0000",
              "x" * 300, 101, "inf", "-Infinity", "1e999", "NaN", "\u2603", "\ud800", "\U0001f600" * 40]
    fields = ["user_id", "inputs", "k", "exclude_seen", "user_features", "", "\u00e9", "__proto__", "\u202e"]
    kind = rng.randrange(12)
    if kind == 0:  # random bytes
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))
    if kind == 1:  # a valid body cut or mutated
        b = bytearray(rng.choice(valid))
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return bytes(b[: rng.randrange(1, len(b) + 1)])
    if kind == 2:  # wrong types in the right fields
        return _json({rng.choice(fields): rng.choice(values), "user_id": rng.choice(values)})
    if kind == 3:  # batches with bad members
        return _json({"inputs": [rng.choice(values + [1, 2]) for _ in range(rng.randrange(0, 8))],
                      "k": rng.choice(values + [5])})
    if kind == 4:  # deep nesting, of lists or objects
        d = rng.randrange(100, 5000)
        return rng.choice([b'{"inputs": ' + b"[" * d + b"]" * d + b"}", b'{"user_id": ' + b'{"a":' * d + b"1" +
                           b"}" * d + b"}", b"[" * d])
    if kind == 5:  # side features: wrong shapes, non-finite numbers as text, unicode
        feature = rng.choice(["age", "occupation", "zip", "gender", "x", "\u00e4ge"])
        return _json({"user_features": {feature: rng.choice(values)}, "k": rng.choice([1, 5, 100])})
    if kind == 6:  # csv garbage
        return "\n".join(rng.choice(["1", "x", "1,2", "", "99999999999999999999", "-", "\u00e9", "\ufeff3", "nan"])
                         for _ in range(rng.randrange(1, 10))).encode()
    if kind == 7:  # JSON that is not an object, NaN/Infinity literals, numbers past every range
        return rng.choice([b"[]", b"42", b'"s"', b"null", b"true", b"NaN", b"{}", b'{"user_id": 1e400}',
                           b'{"user_id": NaN}', b'{"user_id": 1, "k": Infinity}', b'{"user_id": -Infinity}',
                           b'{"user_id": ' + b"9" * rng.randrange(19, 6000) + b"}",
                           b'{"user_id": 1, "k": 1e-400}', b'{"inputs": [1e999, -1e999]}'])
    if kind == 8:  # unicode: in values, in keys, escaped lone surrogates, BOMs, other encodings, bad UTF-8
        doc = {"user_features": {"gender": "\u2640", "zip": "\u65e5\u672c", "occupation": "\u00e9crivain"}}
        return rng.choice([_json(doc), b"\xef\xbb\xbf" + _json({"user_id": 2}), _json({"user_id": 2}).decode()
                           .encode("utf-16"), b'{"user_features": {"zip": "\\ud800"}}', b'{"\xc0\xaf": 1}',
                           _json({"\u00fcser_id": 1}), b'{"user_id": 1, "k": "\xe9"}'])
    if kind == 9:  # numbers at the edges of the ranges
        return _json({"inputs": [rng.choice([2 ** 63 - 1, -(2 ** 63), 0, -1, 1, 50])
                                 for _ in range(rng.randrange(1, 20))], "k": rng.choice([1, 100])})
    return rng.choice(valid)


def _request(rng: random.Random, n: int, prefix: str) -> Sent:
    """A framing-valid HTTP/1.1 request; header values may carry any non-control byte."""
    body = _body(rng)
    content_type = rng.choice([b"application/json", b"text/csv", b"application/json; charset=utf-8",
                               b"application/json; charset=\xe9", b"text/plain", None, b"application/\xff\xfe",
                               b"APPLICATION/JSON", b"application/json;;;", b"*/*", "\u2603/json".encode()])
    accept = rng.choice([None, b"*/*", b"application/json", b"text/csv", b"application/json, text/\xe9",
                         "\u2603".encode(), b"application/json;q=0", b"image/*;q=0.5, */*"])
    inference_id = f"{prefix}-{n}".encode() + rng.choice([b"", b"-\xe9", "-\u2603".encode(), b"-\xff\xfe",
                                                         b" with spaces", b"-" + b"z" * 500])
    method, path, captured = b"POST", b"/invocations", True
    if rng.random() < 0.02:  # other routes and methods: answered, never captured
        method, path = rng.choice([(b"GET", b"/invocations"), (b"POST", b"/ping"), (b"GET", b"/nowhere"),
                                   (b"PUT", b"/invocations"), (b"POST", b"/%C3%A9"), (b"DELETE", b"/ping")])
        captured = False
    head = [method + b" " + path + b" HTTP/1.1", b"Host: x", ID + b": " + inference_id]
    if content_type is not None and rng.random() < 0.97:
        head.append(b"Content-Type: " + content_type)
    if accept is not None:
        head.append(b"Accept: " + accept)
    if rng.random() < 0.1:
        head.append(b"X-Junk: " + "\U0001f600 \u00e9".encode())
    head.append(b"Content-Length: %d" % len(body))
    raw = b"\r\n".join(head) + b"\r\n\r\n" + body
    return Sent(raw, inference_id.decode("latin-1") if captured else None)


async def _read_response(reader: asyncio.StreamReader) -> Tuple[int, dict, bytes]:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("closed without an answer")
    headers = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            body += await reader.readexactly(size)
            await reader.readline()
        await reader.readline()
    else:
        body = await reader.read()
    return int(status_line.split()[1]), headers, body


@dataclass
class Answer:
    sent: Sent
    status: int
    headers: dict
    body: bytes


async def _keepalive_client(port: int, pending, answers: List[Answer]) -> None:
    """Requests one after another on one connection, reconnecting when the server closes it."""
    reader = writer = None
    for sent in pending:
        if writer is None:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(sent.raw)
        status, headers, body = await _read_response(reader)
        answers.append(Answer(sent, status, headers, body))
        if headers.get("connection", "").lower() == "close":
            writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def _one_shot(port: int, sent: Sent) -> Answer:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(sent.raw)
        return Answer(sent, *await _read_response(reader))
    finally:
        writer.close()


async def _huge(port: int, sent: Sent, stream: Optional[bytes] = None) -> Answer:
    """Send a request head and then `stream` (or the rest of `sent`) in 256 KiB pieces, until the
    server answers; a server that answers early closes the connection, so later writes may fail."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    answer = asyncio.ensure_future(_read_response(reader))
    data = sent.raw if stream is None else stream
    try:
        for i in range(0, len(data), 256 * 1024):
            if answer.done():
                break
            try:
                writer.write(data[i:i + 256 * 1024])
                await writer.drain()
            except ConnectionError:
                break
        return Answer(sent, *await answer)
    finally:
        writer.close()


def _huge_requests(rng: random.Random) -> List[Tuple[Sent, Optional[bytes], int]]:
    """(request, what to stream, the status it must get): over the limit declared or chunked (413,
    captured by neither variant), and garbage under the limit (400, captured cut)."""
    out = []
    for n in range(3):
        head = b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n%s: huge-%d\r\n" % (ID, n)
        declared = head + b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1) + b"[" * (MAX_BODY + 1)
        out.append((Sent(declared, None), None, 413))
        chunk = b"[" * 65536
        chunked = head + b"Transfer-Encoding: chunked\r\n\r\n" + (b"10000\r\n" + chunk + b"\r\n") * 100 + b"0\r\n\r\n"
        out.append((Sent(chunked, None), None, 413))
    for n in range(4):
        size = rng.randrange(MAX_BODY // 4, MAX_BODY - 100)
        body = rng.choice([b'{"user_id": "' + b"x" * size + b'"}', b"\xff" * size, b"1\n" * (size // 2)])
        head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\n%s: under-%d\r\n"
                b"Content-Length: %d\r\n\r\n" % (rng.choice([b"application/json", b"text/csv"]), ID, n, len(body)))
        out.append((Sent(head + body, f"under-{n}"), None, 400))
    return out


# HTTP the parser must refuse; none of it reaches /invocations, so none of it is captured
BROKEN_FRAMING = [
    b"GARBAGE\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),  # a TLS ClientHello
    b"GET /nowhere HTTP/9.9\r\nHost: x\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nX-\xe9: 1\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nNoColon\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nX-Ctl: a\x01b\r\n\r\n",
    b"POST /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /ping?\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /nowhere HTTP/1.1\r\n" + b"X-Many: 1\r\n" * 5000 + b"\r\n",
    b"\r\n" * 100,
    b"POST /nowhere HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
]


class Pinger(threading.Thread):
    """GET /ping over its own keep-alive connection every 50 ms; records each latency (inf: failed)."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port, self.latencies, self.failures = port, [], []
        self.stopping = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        while not self.stopping.wait(0.05):
            t0 = time.perf_counter()
            try:
                conn.request("GET", "/ping")
                r = conn.getresponse()
                r.read()
                if r.status != 200:
                    self.failures.append(f"status {r.status}")
            except (OSError, http.client.HTTPException) as e:
                self.failures.append(f"{type(e).__name__}: {e}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
            self.latencies.append(time.perf_counter() - t0)
        conn.close()


def test_adversarial_requests_no_5xx_ping_answered_capture_complete(model_dir, shadow_model_dir, start_server,
                                                                   tmp_path):
    rng = random.Random(SEED)
    capture = tmp_path / "capture"
    # --max-concurrency above the burst: every request is within the bounds the server was given, so
    # every one must be served (beyond them a 503 is the designed answer, tested elsewhere)
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", shadow_model_dir,
                           "--capture-dir", str(capture), "--max-concurrency", "600",
                           "--shadow-max-in-flight", "64", "--keep-alive", str(KEEP_ALIVE),
                           "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT)])
    keepalive = [_request(rng, n, "ka") for n in range(KEEPALIVE_REQUESTS)]
    burst = [_request(rng, n, "burst") for n in range(BURST)]
    huge = _huge_requests(rng)
    slow_body = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{", b" ")
    slow_head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\n", b"X")

    async def main():
        answers: List[Answer] = []
        pending = iter(keepalive)

        async def burst_later():
            await asyncio.sleep(1.0)  # in the middle of the keep-alive traffic
            return await asyncio.gather(*(_one_shot(server.port, s) for s in burst))

        async def slow_later():
            await asyncio.sleep(0.5)
            return await asyncio.gather(*(trickle(server.port, *slow_body) for _ in range(20)),
                                        *(trickle(server.port, *slow_head) for _ in range(20)),
                                        *(trickle(server.port, b"", b"") for _ in range(4)),
                                        *(trickle(server.port, raw, b"") for raw in BROKEN_FRAMING * 3))

        results = await asyncio.gather(burst_later(), slow_later(),
                                       asyncio.gather(*(_huge(server.port, s, stream) for s, stream, _ in huge)),
                                       *(_keepalive_client(server.port, pending, answers)
                                         for _ in range(CONNECTIONS)))
        burst_answers, slow, huge_answers = results[:3]
        return answers, list(burst_answers), slow, list(huge_answers)

    pinger = Pinger(server.port)
    pinger.start()
    t0 = time.perf_counter()
    answers, burst_answers, slow, huge_answers = asyncio.run(main())
    seconds = time.perf_counter() - t0
    pinger.stopping.set()
    pinger.join()
    log = server.log()

    total = len(answers) + len(burst_answers) + len(slow) + len(huge_answers)
    assert total >= 10_000 and len(answers) == KEEPALIVE_REQUESTS and len(burst_answers) == BURST
    statuses = Counter(a.status for a in answers + burst_answers + huge_answers)
    statuses.update(s for s, _, _ in slow if isinstance(s, int))
    assert not [s for s in statuses if s >= 500], (statuses, log[-3000:])
    assert [a.status for a in huge_answers] == [status for _, _, status in huge], [a.body for a in huge_answers]
    assert sum(c for s, c in statuses.items() if 400 <= s < 500) > 7000, statuses  # they really were hostile
    assert statuses[200] > 500, statuses
    for a in answers + burst_answers + huge_answers:
        if a.sent.inference_id is not None:  # every /invocations answer: the id echoed, a 4xx names the field
            assert a.headers[ID.decode().lower()] == a.sent.inference_id
            if a.status >= 400:
                assert json.loads(a.body)["error"]["field"]
    bodies, heads, silent, broken = slow[:20], slow[20:40], slow[40:44], slow[44:]
    assert all(s == 408 and t < BODY_TIMEOUT + SLACK for s, t, _ in bodies), bodies
    assert all(s == 408 and t < HEADER_TIMEOUT + SLACK for s, t, _ in heads), heads
    assert all(s is None and t < KEEP_ALIVE + SLACK for s, t, _ in silent), silent
    assert all(s is None or (isinstance(s, int) and s < 500) for s, _, _ in broken), broken

    assert not pinger.failures, pinger.failures[:5]
    assert len(pinger.latencies) > seconds * 5 and max(pinger.latencies) < 1.0, max(pinger.latencies)
    assert server.alive()
    assert server.stop() == 0
    log = server.log()
    for trouble in ("Exception in ASGI application", "Task exception was never retrieved", "Traceback"):
        assert trouble not in log, log[log.index(trouble) - 2000:][:4000]

    expected = Counter(a.sent.inference_id for a in answers + burst_answers + huge_answers
                       if a.sent.inference_id is not None)
    for variant in ("production", "shadow"):
        records = []
        for path in capture_files(capture, variant):
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    assert line.endswith("\n"), f"{path}:{n}: a cut line"
                    records.append(json.loads(line))
        assert Counter(r["eventMetadata"]["inferenceId"] for r in records) == expected, variant
        cut = [r for r in records if r["eventMetadata"]["customAttributes"].get("truncated")]
        assert {r["eventMetadata"]["inferenceId"] for r in cut} >= {f"under-{n}" for n in range(4)}
