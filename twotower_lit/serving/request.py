"""Request parsing and validation: bytes + content type -> a `RecommendRequest`, or a `RequestError`.

Accepted bodies (``application/json``)::

    {"user_id": 42}
    {"inputs": [42, 7, {"user_id": 9}, {"user_features": {"gender": "F", "age": 25, ...}}]}
    {"user_features": {"gender": "F", "age": 25, "occupation": 3, "zip": "55455"}}

with optional ``"k"`` (1..max_k, default default_k) and ``"exclude_seen"`` (default true); a
top-level ``"user_features"`` goes with the single-user form. A user_id the model knows is scored
from its training features (``user_features`` are then ignored); an unknown one with
``user_features`` is a cold start; an unknown one without them gets the popularity fallback.
``text/csv``: one raw user id per line (blank lines ignored). Every rejection names the field;
nothing here raises anything but `RequestError`.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from twotower_lit.config import ServeConfig
from twotower_lit.data.features import USER_FEATURE_NAMES
from twotower_lit.serving.errors import RequestError, bad_request

JSON = "application/json"
CSV = "text/csv"
CONTENT_TYPES = (JSON, CSV)
ACCEPT_TYPES = (JSON,)

_INT64 = 1 << 63
_MAX_FEATURE_CHARS = 100
_TOP_LEVEL = ("user_id", "inputs", "user_features", "k", "exclude_seen")
_INPUT_KEYS = ("user_id", "user_features")
_CSV_ID = re.compile(r"^[+-]?[0-9]{1,19}$")
# Features whose values are numbers (a string may carry one): "inf" or "1e999" would reach int()
# as an infinite float, and "nan" would silently become "unknown".
_NUMERIC_FEATURES = ("age", "occupation")


@dataclass(frozen=True)
class UserQuery:
    """One user to recommend for: a raw id, raw side features (cold start), or both."""

    user_id: Optional[int] = None
    features: Optional[Dict[str, Union[str, int, None]]] = None


@dataclass(frozen=True)
class RecommendRequest:
    users: Tuple[UserQuery, ...]
    k: int
    exclude_seen: bool = True


def media_type(header: Optional[str]) -> str:
    """'Application/JSON; charset=utf-8' -> 'application/json' ('' when absent)."""
    return (header or "").split(";", 1)[0].strip().lower()


def negotiate(accept: Optional[str]) -> str:
    """The response media type for an Accept header (JSON is all we write); 406 otherwise."""
    if accept is None or not accept.strip():
        return JSON
    for part in accept.split(","):
        mt = media_type(part)
        params = part.split(";")[1:]
        if any(p.strip().replace(" ", "") in ("q=0", "q=0.0", "q=0.00", "q=0.000") for p in params):
            continue
        if mt in ("*/*", "application/*", JSON):
            return JSON
    raise RequestError(406, "Accept", f"cannot produce {accept[:100]!r}; this endpoint answers {JSON}")


def parse_request(body: Union[bytes, str, bytearray], content_type: Optional[str],
                  cfg: ServeConfig) -> RecommendRequest:
    """Validate a request body of `content_type` against the limits in `cfg`."""
    size = len(body)
    if size > cfg.max_body_bytes:
        raise RequestError(413, "body", f"{size} bytes is over the limit of {cfg.max_body_bytes}")
    mt = media_type(content_type)
    if mt not in CONTENT_TYPES:
        shown = (content_type or "")[:100] or "none"
        raise RequestError(415, "Content-Type", f"{shown!r} is not supported; send {JSON} or {CSV}")
    text = body_text(body)
    if not text.strip():
        raise bad_request("body", "empty request")
    return _parse_csv(text, cfg) if mt == CSV else _parse_json(text, cfg)


def body_text(body: Union[bytes, str, bytearray]) -> str:
    """A request body as text: bytes must be UTF-8 (the error names the first bad byte)."""
    if not isinstance(body, (bytes, bytearray)):
        return body
    try:
        return bytes(body).decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request("body", f"not valid UTF-8 (byte {e.start})") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _parse_json(text: str, cfg: ServeConfig) -> RecommendRequest:
    try:
        doc = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise bad_request("body", "JSON nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, NaN/Infinity, integers over Python's digit limit
        raise bad_request("body", f"malformed JSON: {str(e)[:200]}") from None
    if not isinstance(doc, dict):
        raise bad_request("body", f"expected a JSON object, got {_kind(doc)}")
    unknown = [key for key in doc if key not in _TOP_LEVEL]
    if unknown:
        raise bad_request(_name(unknown[0]), f"unknown field; allowed: {', '.join(_TOP_LEVEL)}")
    k = _int_in(doc.get("k", cfg.default_k), "k", 1, cfg.max_k)
    exclude_seen = doc.get("exclude_seen", True)
    if not isinstance(exclude_seen, bool):
        raise bad_request("exclude_seen", f"expected true or false, got {_kind(exclude_seen)}")
    if "inputs" in doc:
        if "user_id" in doc or "user_features" in doc:
            raise bad_request("inputs", "give either 'inputs' (a batch) or 'user_id'/'user_features', not both")
        inputs = doc["inputs"]
        if not isinstance(inputs, list):
            raise bad_request("inputs", f"expected a list of user ids, got {_kind(inputs)}")
        if not inputs:
            raise bad_request("inputs", "the list is empty")
        if len(inputs) > cfg.max_batch:
            raise bad_request("inputs", f"{len(inputs)} users is over the limit of {cfg.max_batch} per request")
        users = tuple(_user(item, f"inputs[{i}]") for i, item in enumerate(inputs))
    elif "user_id" in doc or "user_features" in doc:
        users = (_user({key: doc[key] for key in _INPUT_KEYS if key in doc}, ""),)
    else:
        raise bad_request("user_id", "missing: send 'user_id', 'user_features' or 'inputs'")
    return RecommendRequest(users=users, k=k, exclude_seen=exclude_seen)


def _parse_csv(text: str, cfg: ServeConfig) -> RecommendRequest:
    users: List[UserQuery] = []
    for n, line in enumerate(text.splitlines(), start=1):
        value = line.strip()
        if not value:
            continue
        if not _CSV_ID.match(value):
            raise bad_request(f"line {n}", f"expected one integer user id per line, got {value[:50]!r}")
        if len(users) == cfg.max_batch:
            raise bad_request("body", f"more than {cfg.max_batch} users per request")
        users.append(UserQuery(user_id=_int64(int(value), f"line {n}")))
    if not users:
        raise bad_request("body", "no user ids")
    return RecommendRequest(users=tuple(users), k=cfg.default_k, exclude_seen=True)


def _user(item: Any, where: str) -> UserQuery:
    if _is_int(item):
        return UserQuery(user_id=_int64(item, where or "user_id"))
    if not isinstance(item, dict):
        raise bad_request(where or "user_id", f"expected a user id (integer) or an object, got {_kind(item)}")
    prefix = f"{where}." if where else ""
    for key in item:
        if key not in _INPUT_KEYS:
            raise bad_request(prefix + _name(key), f"unknown field; allowed: {', '.join(_INPUT_KEYS)}")
    if "user_id" not in item and "user_features" not in item:
        raise bad_request(f"{prefix}user_id", "missing: give 'user_id', 'user_features' or both")
    user_id = None
    if item.get("user_id") is not None:
        if not _is_int(item["user_id"]):
            raise bad_request(f"{prefix}user_id", f"expected an integer, got {_kind(item['user_id'])}")
        user_id = _int64(item["user_id"], f"{prefix}user_id")
    features = None
    if "user_features" in item:
        features = _features(item["user_features"], f"{prefix}user_features")
    return UserQuery(user_id=user_id, features=features)


def _features(raw: Any, where: str) -> Dict[str, Union[str, int, None]]:
    if not isinstance(raw, dict):
        raise bad_request(where, f"expected an object like {{\"gender\": \"F\", \"age\": 25}}, got {_kind(raw)}")
    out: Dict[str, Union[str, int, None]] = {}
    for key, value in raw.items():
        if key not in USER_FEATURE_NAMES:
            raise bad_request(f"{where}.{_name(key)}", f"unknown feature; allowed: {', '.join(USER_FEATURE_NAMES)}")
        if value is not None and not _is_int(value) and not isinstance(value, str):
            raise bad_request(f"{where}.{key}", f"expected a string or an integer, got {_kind(value)}")
        if isinstance(value, str) and len(value) > _MAX_FEATURE_CHARS:
            raise bad_request(f"{where}.{key}", f"longer than {_MAX_FEATURE_CHARS} characters")
        if _is_int(value):
            value = _int64(value, f"{where}.{key}")
        elif isinstance(value, str) and key in _NUMERIC_FEATURES:
            _check_number_text(value, key, f"{where}.{key}")
        out[key] = value
    return out


def _check_number_text(text: str, key: str, where: str) -> None:
    """A numeric feature sent as a string: finite if it is a number; age must be one (an
    occupation may also be a name, as in ml-100k)."""
    try:
        number = float(text)
    except ValueError:
        if key == "age":
            raise bad_request(where, f"expected a number of years or an ml-1m age group, got {text[:50]!r}") from None
        return
    if not math.isfinite(number):
        raise bad_request(where, f"{text[:50]!r} is not a finite number")


def _name(key: str) -> str:
    """A field name as it can be shown: quoted when empty or not a plain name."""
    return key[:100] if key.isidentifier() else json.dumps(key[:100])


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int64(value: int, where: str) -> int:
    if not -_INT64 <= value < _INT64:
        raise bad_request(where, "out of the 64-bit integer range")
    return value


def _int_in(value: Any, where: str, lo: int, hi: int) -> int:
    if not _is_int(value):
        raise bad_request(where, f"expected an integer, got {_kind(value)}")
    if not lo <= value <= hi:
        raise bad_request(where, f"{value} is out of range {lo}..{hi}")
    return value


def _kind(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", float: "a number with a fraction",
             type(None): "null", int: "an integer"}
    return names.get(type(value), type(value).__name__)
