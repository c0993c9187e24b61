"""Client errors of the inference API: an HTTP status, the offending field and a message."""
from __future__ import annotations

import json
from typing import Dict


class RequestError(Exception):
    """A request the server will not serve because of the request itself (4xx, never 5xx).

    `field` names what was wrong: a JSON path like ``inputs[2].user_features.age``, or
    ``body``, ``Content-Type``, ``Accept``.
    """

    def __init__(self, status: int, field: str, detail: str) -> None:
        Exception.__init__(self, f"{field}: {detail}")
        self.status = status
        self.field = field
        self.detail = detail

    def payload(self) -> Dict:
        return {"error": {"status": self.status, "field": self.field, "message": self.detail}}

    def body(self) -> bytes:
        return json.dumps(self.payload(), ensure_ascii=False).encode("utf-8")


def bad_request(field: str, message: str) -> RequestError:
    return RequestError(400, field, message)
