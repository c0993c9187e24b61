"""Micro-batching: requests scored together get the answers they get alone, each with its own k and
seen-item exclusion; concurrent requests to the real server are batched (its /ping counts the batches)."""
import asyncio
import json

import httpx

from twotower_lit.config import ServeConfig
from twotower_lit.serving import handler
from twotower_lit.serving.request import JSON


def _requests():
    """Known users with different k and exclude_seen, cold start, unknown users, a JSON-lines body."""
    bodies = [({"user_id": 3, "k": 5}, JSON), ({"user_id": 3, "k": 12, "exclude_seen": False}, JSON),
              ({"inputs": [1, 2, 40, 99999], "k": 7}, JSON),
              ({"user_features": {"gender": "F", "age": 35, "occupation": 4}, "k": 3}, JSON),
              ({"user_id": 77777, "k": 4}, JSON), ({"user_id": 50}, JSON)]
    out = [(json.dumps(b), ct) for b, ct in bodies]
    out.append(('{"user_id": 8, "k": 2}\n{"inputs": [9, 10], "k": 9, "exclude_seen": false}\n',
                handler.JSON_LINES))
    return out


def _same(a, b):
    """Equal answers, scores to the last digit (the user tower and the final scores do not round
    differently with the batch's size), items named, in the same order."""
    assert a == b


def test_a_batch_answers_each_request_as_it_is_answered_alone(model_dir):
    model = handler.load_model(model_dir, ServeConfig())
    cfg = model.config
    requests = [handler.decode(body, ct, cfg) for body, ct in _requests()]
    alone = [handler.predict(r, model) for r in requests]
    together = handler.predict_batch(requests, model)
    _same(together, alone)
    # the seen items of each known user stay out of its own answer, and only of its own
    seen = {u: {model.recommender.model.items[c]["id"] for c in
                (model.recommender.model.seen(model.recommender.user_index[u]) - 1).tolist()} for u in (3, 1, 2, 40)}
    assert not seen[3] & {it["id"] for it in together[0]["predictions"][0]["items"]}
    for p in together[2]["predictions"][:3]:
        assert not seen[p["user_id"]] & {it["id"] for it in p["items"]} and len(p["items"]) == 7


def test_concurrent_requests_to_the_server_are_batched_with_unbatched_answers(model_dir, start_server):
    batched = start_server(["--model-dir", model_dir, "--batch-max-requests", "16", "--batch-max-wait-ms", "20"])
    alone = start_server(["--model-dir", model_dir, "--batch-max-requests", "1"])
    requests = _requests() * 4

    async def send_all(url):
        async with httpx.AsyncClient(timeout=30, limits=httpx.Limits(max_connections=64)) as client:
            return await asyncio.gather(*(client.post(url + "/invocations", content=body,
                                                      headers={"Content-Type": ct}) for body, ct in requests))

    got, want = asyncio.run(send_all(batched.url)), asyncio.run(send_all(alone.url))
    assert [r.status_code for r in got] == [200] * len(requests), [r.text for r in got if r.status_code != 200]

    def parse(r):
        return [json.loads(line) for line in r.text.splitlines()] if "jsonlines" in r.headers["content-type"] \
            else r.json()

    _same([parse(r) for r in got], [parse(r) for r in want])
    ping = httpx.get(batched.url + "/ping").json()["batching"]
    assert ping["requests"] == len(requests) and ping["batches"] < len(requests), ping
    one = httpx.get(alone.url + "/ping").json()["batching"]
    assert one["max_requests"] == 1 and one["batches"] == one["requests"] == len(requests), one
    # a client error in a batch stays with its own request
    async def mixed():
        async with httpx.AsyncClient(timeout=30) as client:
            return await asyncio.gather(client.post(batched.url + "/invocations", json={"user_id": 4, "k": 0}),
                                        client.post(batched.url + "/invocations", json={"user_id": 4, "k": 3}))

    bad, good = asyncio.run(mixed())
    assert bad.status_code == 400 and bad.json()["error"]["field"] == "k"
    assert good.status_code == 200 and len(good.json()["predictions"][0]["items"]) == 3
