"""Slow clients against the real server over real sockets: bodies and request heads sent a byte at
a time, and connections that send nothing, hold no compute slot and are answered 408 or closed
within their deadlines, while valid requests from other clients are answered at once."""
import asyncio
import json
import time

import httpx

from tests.serving.conftest import trickle

BODY_TIMEOUT = HEADER_TIMEOUT = KEEP_ALIVE = 2
SLACK = 3.0  # seconds beyond a deadline that a loaded two-core CI machine may take


def test_slow_clients_hold_no_slot_and_are_cut_off(model_dir, start_server):
    # 4 requests may wait for the model: 24 slow bodies would have taken every slot
    server = start_server(["--model-dir", model_dir, "--max-concurrency", "4", "--keep-alive", str(KEEP_ALIVE)],
                          env={"TWOTOWER_BODY_TIMEOUT": str(BODY_TIMEOUT),
                               "TWOTOWER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)})
    slow_body = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 1000\r\n\r\n{", b" ")
    slow_head = (b"POST /invocations HTTP/1.1\r\nHost: x\r\n", b"X")
    silent = (b"", b"")

    async def valid_requests(n: int):
        await asyncio.sleep(0.5)  # the slow clients are connected and sending
        out = []
        async with httpx.AsyncClient(timeout=10) as client:
            for i in range(n):
                t0 = time.perf_counter()
                r = await client.post(server.url + "/invocations", json={"user_id": 1 + i % 50, "k": 3})
                out.append((r.status_code, time.perf_counter() - t0))
        return out

    async def main():
        slow = [trickle(server.port, *slow_body) for _ in range(24)]
        slow += [trickle(server.port, *slow_head) for _ in range(12)]
        slow += [trickle(server.port, *silent) for _ in range(4)]
        return await asyncio.gather(valid_requests(30), *slow)

    valid, *slow = asyncio.run(main())
    assert [s for s, _ in valid] == [200] * 30, (valid, server.log()[-3000:])
    assert max(t for _, t in valid) < 1.0, valid
    bodies, heads, silents = slow[:24], slow[24:36], slow[36:]
    for status, seconds, data in bodies:
        assert status == 408 and BODY_TIMEOUT - 0.5 < seconds < BODY_TIMEOUT + SLACK, (status, seconds)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["field"] == "body"
        assert b"connection: close" in data.lower()
    for status, seconds, data in heads:
        assert status == 408 and HEADER_TIMEOUT - 0.5 < seconds < HEADER_TIMEOUT + SLACK, (status, seconds)
        assert json.loads(data.split(b"\r\n\r\n", 1)[1])["error"]["field"] == "headers"
    for status, seconds, _ in silents:
        assert status is None and KEEP_ALIVE - 0.5 < seconds < KEEP_ALIVE + SLACK, (status, seconds)
    assert server.alive() and httpx.get(server.url + "/ping").status_code == 200


def test_a_head_sent_in_pieces_within_the_deadline_is_served(model_dir, start_server):
    """The head's deadline runs from its first byte; a client that is merely not instant is served,
    and a keep-alive connection gets a fresh deadline for each request."""
    server = start_server(["--model-dir", model_dir], env={"TWOTOWER_HEADER_TIMEOUT": str(HEADER_TIMEOUT)})
    body = b'{"user_id": 2, "k": 2}'
    request = (b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: %d\r\n\r\n" % len(body)) + body

    async def main():
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        statuses = []
        for _ in range(2):
            for i in range(0, len(request), 20):  # about 1.2 s per request head
                writer.write(request[i:i + 20])
                await asyncio.sleep(0.15)
            statuses.append(int((await reader.readline()).split()[1]))
            length = 0
            while (line := await reader.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
        writer.close()
        return statuses

    assert asyncio.run(main()) == [200, 200]
