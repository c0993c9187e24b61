"""Request validation: every accepted shape, and every class of bad input -> status + field."""
import json

import pytest

from twotower_lit.config import ServeConfig
from twotower_lit.serving.errors import RequestError
from twotower_lit.serving.request import UserQuery, negotiate, parse_request

CFG = ServeConfig(max_body_bytes=4096, max_batch=5, max_k=100, default_k=10)
JSON = "application/json"


def parse(doc, content_type=JSON):
    body = doc if isinstance(doc, (bytes, str)) else json.dumps(doc).encode()
    return parse_request(body, content_type, CFG)


def test_single_user_defaults():
    req = parse({"user_id": 42})
    assert req.users == (UserQuery(user_id=42),)
    assert (req.k, req.exclude_seen) == (10, True)


def test_batch_with_mixed_entries_and_options():
    req = parse({"inputs": [42, {"user_id": 7}, {"user_features": {"gender": "F", "age": 25, "zip": "55455"}}],
                 "k": 3, "exclude_seen": False})
    assert [u.user_id for u in req.users] == [42, 7, None]
    assert req.users[2].features == {"gender": "F", "age": 25, "zip": "55455"}
    assert (req.k, req.exclude_seen) == (3, False)


def test_cold_start_single_form_and_str_body():
    req = parse_request('{"user_features": {"occupation": 3, "zip": null}}', "application/json; charset=utf-8", CFG)
    assert req.users == (UserQuery(features={"occupation": 3, "zip": None}),)


def test_csv_one_id_per_line():
    req = parse(b"42\n\n 7 \r\n-3\n", "text/csv")
    assert [u.user_id for u in req.users] == [42, 7, -3]
    assert req.k == CFG.default_k


def test_limits_themselves_are_accepted():
    """Each limit is inclusive: exactly max_batch users (JSON and CSV), k of 1 and of max_k, a body
    of exactly max_body_bytes, and the ends of the 64-bit id range."""
    ids = list(range(1, CFG.max_batch + 1))
    assert [u.user_id for u in parse({"inputs": ids}).users] == ids
    assert [u.user_id for u in parse("\n".join(map(str, ids)).encode(), "text/csv").users] == ids
    assert parse({"user_id": 1, "k": CFG.max_k}).k == CFG.max_k
    assert parse({"user_id": 1, "k": 1}).k == 1
    body = b'{"user_id": 1}'
    padded = body[:-1] + b" " * (CFG.max_body_bytes - len(body)) + b"}"
    assert len(padded) == CFG.max_body_bytes and parse(padded).users == (UserQuery(user_id=1),)
    ends = [2 ** 63 - 1, -2 ** 63]
    assert [u.user_id for u in parse({"inputs": ends}).users] == ends
    assert [u.user_id for u in parse(b"9223372036854775807\n-9223372036854775808\n", "text/csv").users] == ends
    for too_big in ({"inputs": [2 ** 63]}, {"inputs": [-2 ** 63 - 1]}):
        with pytest.raises(RequestError, match="64-bit"):
            parse(too_big)


@pytest.mark.parametrize("body,content_type,status,field", [
    (b"{", JSON, 400, "body"),
    (b"", JSON, 400, "body"),
    (b"   ", JSON, 400, "body"),
    (b"\xff\xfe", JSON, 400, "body"),
    (b"[1, 2]", JSON, 400, "body"),
    (b"null", JSON, 400, "body"),
    (b'{"user_id": NaN}', JSON, 400, "body"),
    (b'{"user_id": ' + b"[" * 1500 + b"]" * 1500 + b"}", JSON, 400, "body"),
    (b'{"user_id": "42"}', JSON, 400, "user_id"),
    (b'{"user_id": 4.2}', JSON, 400, "user_id"),
    (b'{"user_id": true}', JSON, 400, "user_id"),
    (b'{"user_id": 99999999999999999999}', JSON, 400, "user_id"),
    (b'{"k": 5}', JSON, 400, "user_id"),
    (b'{"user_id": 1, "k": 0}', JSON, 400, "k"),
    (b'{"user_id": 1, "k": 101}', JSON, 400, "k"),
    (b'{"user_id": 1, "k": "10"}', JSON, 400, "k"),
    (b'{"user_id": 1, "k": 10.0}', JSON, 400, "k"),
    (b'{"user_id": 1, "exclude_seen": "yes"}', JSON, 400, "exclude_seen"),
    (b'{"user_id": 1, "kk": 5}', JSON, 400, "kk"),
    (b'{"inputs": 5}', JSON, 400, "inputs"),
    (b'{"inputs": []}', JSON, 400, "inputs"),
    (b'{"inputs": [1, 2, 3, 4, 5, 6]}', JSON, 400, "inputs"),
    (b'{"inputs": [1, "x"]}', JSON, 400, "inputs[1]"),
    (b'{"inputs": [1, {"uid": 3}]}', JSON, 400, "inputs[1].uid"),
    (b'{"inputs": [1, {}]}', JSON, 400, "inputs[1].user_id"),
    (b'{"inputs": [1], "user_id": 3}', JSON, 400, "inputs"),
    (b'{"user_features": [1]}', JSON, 400, "user_features"),
    (b'{"user_features": {"height": 180}}', JSON, 400, "user_features.height"),
    (b'{"user_features": {"age": [25]}}', JSON, 400, "user_features.age"),
    (b'{"user_features": {"age": true}}', JSON, 400, "user_features.age"),
    (b'{"user_features": {"age": "twenty"}}', JSON, 400, "user_features.age"),
    (b'{"user_features": {"age": 1e999}}', JSON, 400, "user_features.age"),
    (b'{"user_features": {"age": "nan"}}', JSON, 400, "user_features.age"),
    (b'{"inputs": [{"user_features": {"occupation": "-Infinity"}}]}', JSON, 400, "inputs[0].user_features.occupation"),
    (b'{"user_id": 1e999}', JSON, 400, "user_id"),
    (b'{"user_id": 1, "k": 1e999}', JSON, 400, "k"),
    (b'{"user_id": 1, "k": -Infinity}', JSON, 400, "body"),
    (b'{"inputs": [1e999]}', JSON, 400, "inputs[0]"),
    (b'{"inputs": [{"user_features": {"zip": "' + b"1" * 200 + b'"}}]}', JSON, 400, "inputs[0].user_features.zip"),
    (b"42\nabc\n", "text/csv", 400, "line 2"),
    (b"1,2\n", "text/csv", 400, "line 1"),
    (b"\n\n", "text/csv", 400, "body"),
    (b"1\n2\n3\n4\n5\n6\n", "text/csv", 400, "body"),
    (b'{"user_id": 1}', "text/plain", 415, "Content-Type"),
    (b'{"user_id": 1}', None, 415, "Content-Type"),
    (b"x" * 5000, JSON, 413, "body"),
])
def test_bad_input_names_the_field(body, content_type, status, field):
    with pytest.raises(RequestError) as err:
        parse_request(body, content_type, CFG)
    assert (err.value.status, err.value.field) == (status, field), err.value.detail
    payload = err.value.payload()["error"]
    assert payload["field"] == field and payload["message"]


@pytest.mark.parametrize("accept,ok", [(None, True), ("", True), ("*/*", True), ("application/json", True),
                                       ("text/html, application/*;q=0.8", True), ("text/csv", False),
                                       ("application/json;q=0", False), ("image/png", False)])
def test_accept_negotiation(accept, ok):
    if ok:
        assert negotiate(accept) == "application/json"
    else:
        with pytest.raises(RequestError) as err:
            negotiate(accept)
        assert (err.value.status, err.value.field) == (406, "Accept")


def test_integer_beyond_pythons_digit_limit_is_a_client_error():
    body = b'{"user_id": ' + b"9" * 5000 + b"}"
    with pytest.raises(RequestError) as err:
        parse_request(body, JSON, ServeConfig())
    assert (err.value.status, err.value.field) == (400, "body")
