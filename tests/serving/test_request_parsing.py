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
    assert req.k == CFG.default_k and req.exclude_seen is True


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


@pytest.mark.parametrize("body,content_type,status,field,message", [
    (b"{", JSON, 400, "body",
     'malformed JSON: Expecting property name enclosed in double quotes...'),
    (b"", JSON, 400, "body",
     'empty request'),
    (b"   ", JSON, 400, "body",
     'empty request'),
    (b"\xff\xfe", JSON, 400, "body",
     'not valid UTF-8 (byte 0)'),
    (b"[1, 2]", JSON, 400, "body",
     'expected a JSON object, got a list'),
    (b"null", JSON, 400, "body",
     'expected a JSON object, got null'),
    (b'{"user_id": NaN}', JSON, 400, "body",
     'malformed JSON: NaN is not valid JSON'),
    (b'{"user_id": ' + b"[" * 1500 + b"]" * 1500 + b"}", JSON, 400, "body",
     'JSON nested too deeply'),
    (b'{"user_id": "42"}', JSON, 400, "user_id",
     'expected an integer, got a string'),
    (b'{"user_id": 4.2}', JSON, 400, "user_id",
     'expected an integer, got a number with a fraction'),
    (b'{"user_id": true}', JSON, 400, "user_id",
     'expected an integer, got a boolean'),
    (b'{"user_id": 99999999999999999999}', JSON, 400, "user_id",
     'out of the 64-bit integer range'),
    (b'{"k": 5}', JSON, 400, "user_id",
     "missing: send 'user_id', 'user_features' or 'inputs'"),
    (b'{"user_id": 1, "k": 0}', JSON, 400, "k",
     '0 is out of range 1..100'),
    (b'{"user_id": 1, "k": 101}', JSON, 400, "k",
     '101 is out of range 1..100'),
    (b'{"user_id": 1, "k": "10"}', JSON, 400, "k",
     'expected an integer, got a string'),
    (b'{"user_id": 1, "k": 10.0}', JSON, 400, "k",
     'expected an integer, got a number with a fraction'),
    (b'{"user_id": 1, "exclude_seen": "yes"}', JSON, 400, "exclude_seen",
     'expected true or false, got a string'),
    (b'{"user_id": 1, "kk": 5}', JSON, 400, "kk",
     'unknown field; allowed: user_id, inputs, user_features, k, exclude_seen'),
    (b'{"inputs": 5}', JSON, 400, "inputs",
     'expected a list of user ids, got an integer'),
    (b'{"inputs": []}', JSON, 400, "inputs",
     'the list is empty'),
    (b'{"inputs": [1, 2, 3, 4, 5, 6]}', JSON, 400, "inputs",
     '6 users is over the limit of 5 per request'),
    (b'{"inputs": [1, "x"]}', JSON, 400, "inputs[1]",
     'expected a user id (integer) or an object, got a string'),
    (b'{"inputs": [1, {"uid": 3}]}', JSON, 400, "inputs[1].uid",
     'unknown field; allowed: user_id, user_features'),
    (b'{"inputs": [1, {}]}', JSON, 400, "inputs[1].user_id",
     "missing: give 'user_id', 'user_features' or both"),
    (b'{"inputs": [1], "user_features": {"age": 25}}', JSON, 400, "inputs",
     "give either 'inputs' (a batch) or 'user_id'/'user_features', not both"),
    (b'{"inputs": [1], "user_id": 3}', JSON, 400, "inputs",
     "give either 'inputs' (a batch) or 'user_id'/'user_features', not both"),
    (b'{"user_features": [1]}', JSON, 400, "user_features",
     'expected an object like {"gender": "F", "age": 25}, got a list'),
    (b'{"user_features": {"height": 180}}', JSON, 400, "user_features.height",
     'unknown feature; allowed: gender, age, occupation, zip'),
    (b'{"user_features": {"age": [25]}}', JSON, 400, "user_features.age",
     'expected a string or an integer, got a list'),
    (b'{"user_features": {"age": true}}', JSON, 400, "user_features.age",
     'expected a string or an integer, got a boolean'),
    (b'{"user_features": {"age": "twenty"}}', JSON, 400, "user_features.age",
     "expected a number of years or an ml-1m age group, got 'twenty'"),
    (b'{"user_features": {"age": 1e999}}', JSON, 400, "user_features.age",
     'expected a string or an integer, got a number with a fraction'),
    (b'{"user_features": {"age": "nan"}}', JSON, 400, "user_features.age",
     "'nan' is not a finite number"),
    (b'{"inputs": [{"user_features": {"occupation": "-Infinity"}}]}', JSON, 400, "inputs[0].user_features.occupation",
     "'-Infinity' is not a finite number"),
    (b'{"user_id": 1e999}', JSON, 400, "user_id",
     'expected an integer, got a number with a fraction'),
    (b'{"user_id": 1, "k": 1e999}', JSON, 400, "k",
     'expected an integer, got a number with a fraction'),
    (b'{"user_id": 1, "k": -Infinity}', JSON, 400, "body",
     'malformed JSON: -Infinity is not valid JSON'),
    (b'{"inputs": [1e999]}', JSON, 400, "inputs[0]",
     'expected a user id (integer) or an object, got a number with a fraction'),
    (b'{"inputs": [{"user_features": {"zip": "' + b"1" * 200 + b'"}}]}', JSON, 400, "inputs[0].user_features.zip",
     'longer than 100 characters'),
    (b"42\nabc\n", "text/csv", 400, "line 2",
     "expected one integer user id per line, got 'abc'"),
    (b"1,2\n", "text/csv", 400, "line 1",
     "expected one integer user id per line, got '1,2'"),
    (b"\n\n", "text/csv", 400, "body",
     'empty request'),
    (b"1\n2\n3\n4\n5\n6\n", "text/csv", 400, "body",
     'more than 5 users per request'),
    (b'{"user_id": 1}', "text/plain", 415, "Content-Type",
     "'text/plain' is not supported; send application/json or text/csv"),
    (b'{"user_id": 1}', None, 415, "Content-Type",
     "'none' is not supported; send application/json or text/csv"),
    (b"x" * 5000, JSON, 413, "body",
     '5000 bytes is over the limit of 4096'),
])
def test_bad_input_names_the_field(body, content_type, status, field, message):
    """Status, field and the message that says what is wrong (exactly; '...' ends a message whose
    tail is the JSON parser's own words)."""
    with pytest.raises(RequestError) as err:
        parse_request(body, content_type, CFG)
    assert (err.value.status, err.value.field) == (status, field), err.value.detail
    if message.endswith("..."):
        assert err.value.detail.startswith(message[:-3]), err.value.detail
    else:
        assert err.value.detail == message
    payload = err.value.payload()["error"]
    assert payload["field"] == field and payload["message"]


@pytest.mark.parametrize("accept,ok", [(None, True), ("", True), ("*/*", True), ("application/json", True),
                                       ("text/html, application/*;q=0.8", True), ("text/csv", False),
                                       ("text/html,application/json", True),  # no space after the comma
                                       ("text/csv;q=0, application/json", True),  # a refused type, then ours
                                       ("application/json;q=0", False), ("application/json; q = 0", False),
                                       ("application/json;q=0.0", False), ("application/json;q=0.00", False),
                                       ("application/json;q=0.000", False), ("image/png", False)])
def test_accept_negotiation(accept, ok):
    if ok:
        assert negotiate(accept) == "application/json"
    else:
        with pytest.raises(RequestError) as err:
            negotiate(accept)
        assert (err.value.status, err.value.field) == (406, "Accept")
        assert err.value.detail == f"cannot produce {accept!r}; this endpoint answers application/json"


def test_integer_beyond_pythons_digit_limit_is_a_client_error():
    body = b'{"user_id": ' + b"9" * 5000 + b"}"
    with pytest.raises(RequestError) as err:
        parse_request(body, JSON, ServeConfig())
    assert (err.value.status, err.value.field) == (400, "body")


def test_media_type_parameters_and_odd_field_names():
    """Content-Type parameters after the media type (any number), a numeric feature as a string,
    a feature of exactly the length limit, and a field name that is not a plain name shown quoted."""
    for content_type in ("application/json; charset=utf-8; boundary=x", "Application/JSON;charset=utf-8"):
        assert parse_request(b'{"user_id": 3}', content_type, CFG).users == (UserQuery(user_id=3),)
    req = parse({"user_features": {"age": "25", "occupation": "writer", "zip": "9" * 100}})
    assert req.users[0].features == {"age": "25", "occupation": "writer", "zip": "9" * 100}
    for doc, field in (({"user_id": 1, "": 2}, '""'), ({"user_id": 1, "a b": 2}, '"a b"'),
                       ({"user_id": 1, "x" * 150: 2}, "x" * 100),
                       ({"inputs": [{"user_features": {"gender": "F", "a-b": 1}}]}, 'inputs[0].user_features."a-b"')):
        with pytest.raises(RequestError) as err:
            parse(doc)
        assert err.value.field == field
    with pytest.raises(RequestError) as err:
        parse({"inputs": [{"user_id": 4.5}]})
    assert (err.value.field, err.value.detail) == ("inputs[0].user_id",
                                                   "expected an integer, got a number with a fraction")
    with pytest.raises(RequestError) as err:
        parse({"inputs": [[1]]})
    assert (err.value.field, err.value.detail) == ("inputs[0]", "expected a user id (integer) or an object, got a list")
    with pytest.raises(RequestError) as err:
        parse({"user_features": {"zip": {"a": 1}}})
    assert err.value.detail == "expected a string or an integer, got an object"
    with pytest.raises(RequestError) as err:
        parse({"user_features": {"age": 2 ** 64}})
    assert (err.value.field, err.value.detail) == ("user_features.age", "out of the 64-bit integer range")
    with pytest.raises(RequestError) as err:
        parse(b"1\n9999999999999999999\n", "text/csv")  # 19 digits, over 2**63 - 1
    assert (err.value.field, err.value.detail) == ("line 2", "out of the 64-bit integer range")
    with pytest.raises(RequestError) as err:
        parse({"user_features": {"age": "x" * 60}})
    assert err.value.detail == f"expected a number of years or an ml-1m age group, got {'x' * 50!r}"
    with pytest.raises(RequestError) as err:
        parse({"user_features": {"age": "inf" + " " * 60}})
    assert err.value.detail == f"{('inf' + ' ' * 60)[:50]!r} is not a finite number"


def test_echoed_input_is_cut_in_messages():
    """What a message repeats of the request is cut (100 characters of an Accept or Content-Type
    header or a field name, 50 of a CSV line), and only numeric features must be finite numbers."""
    long_accept = "x/" + "y" * 150
    with pytest.raises(RequestError) as err:
        negotiate(long_accept)
    assert err.value.detail == f"cannot produce {long_accept[:100]!r}; this endpoint answers application/json"
    long_type = "a/" + "b" * 150
    with pytest.raises(RequestError) as err:
        parse_request(b"{}", long_type, CFG)
    assert err.value.detail == f"{long_type[:100]!r} is not supported; send application/json or text/csv"
    with pytest.raises(RequestError) as err:
        parse(b"1\n" + b"z" * 80 + b"\n", "text/csv")
    assert err.value.detail == f"expected one integer user id per line, got {'z' * 50!r}"
    with pytest.raises(RequestError) as err:
        parse({"user_id": 1, "-" * 150: 2})
    assert err.value.field == json.dumps("-" * 100)
    req = parse({"user_features": {"gender": "nan", "zip": "inf"}})  # not numeric features: any text
    assert req.users[0].features == {"gender": "nan", "zip": "inf"}
