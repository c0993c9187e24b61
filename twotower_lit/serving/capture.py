"""Data capture in SageMaker's format: one JSON line per invocation and variant, under
``<root>/<endpoint>/<variant>/yyyy/mm/dd/hh/<mm>-<ss>-<mmm>-<uuid>.jsonl`` (UTC).

A record::

    {"captureData": {"endpointInput":  {"observedContentType": ..., "mode": "INPUT",  "data": ..., "encoding": ...},
                     "endpointOutput": {"observedContentType": ..., "mode": "OUTPUT", "data": ..., "encoding": ...}},
     "eventMetadata": {"eventId": ..., "inferenceId": ..., "inferenceTime": "2026-11-26T20:00:00.123Z",
                       "customAttributes": {"variant", "role", "statusCode", "latencyMs", "modelLatencyMs",
                                            "modelVersion", "error"}},
     "eventVersion": "0"}

``encoding`` is JSON or CSV for those content types (data is the text) and BASE64 otherwise or
when the bytes are not UTF-8. The production and shadow records of one request share ``eventId``
and ``inferenceId``. ``customAttributes`` is this project's addition (SageMaker keeps latency in
CloudWatch, not in the capture): the shadow report reads latency and status from it.

A payload over ``max_payload_bytes`` (the server's ``--capture-max-payload-bytes``) is captured
cut to that size (at a character boundary when it is UTF-8 text), and
``customAttributes.truncated`` maps each cut entry to its original size, e.g.
``{"endpointInput": 6291456}``: one hostile request must not write megabytes per variant.

Records are queued and written by one background thread, flushed about every 0.2 s, and all of
them are on disk when `close()` returns (the server calls it at shutdown).
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import os
import queue
import threading
import uuid
from typing import Dict, Optional, Tuple

log = logging.getLogger(__name__)

EVENT_VERSION = "0"
_CSV_TYPES = ("text/csv",)
_FLUSH_SECONDS = 0.2
_CLOSE = object()  # queued by close(): write what came before, then stop


def encode_data(data: bytes, content_type: Optional[str]) -> Tuple[str, str]:
    """(data, encoding) as SageMaker's capture writes them."""
    mt = (content_type or "").split(";", 1)[0].strip().lower()
    kind = "JSON" if mt == "application/json" or mt.endswith("+json") else "CSV" if mt in _CSV_TYPES else None
    if kind:
        try:
            return data.decode("utf-8"), kind
        except UnicodeDecodeError:
            pass
    return base64.b64encode(data).decode("ascii"), "BASE64"


def decode_data(entry: Dict) -> bytes:
    """The bytes of a captured endpointInput / endpointOutput."""
    if entry.get("encoding") == "BASE64":
        return base64.b64decode(entry.get("data", ""))
    return entry.get("data", "").encode("utf-8")


def _cut(data: bytes, limit: Optional[int], entry: str, truncated: Dict[str, int]) -> bytes:
    if limit is None or len(data) <= limit:
        return data
    truncated[entry] = len(data)
    cut = limit
    while cut > 0 and limit - cut < 3 and (data[cut] & 0xC0) == 0x80:  # not inside a UTF-8 character
        cut -= 1
    return data[:cut]


def capture_record(event_id: str, inference_id: str, when: dt.datetime, input_body: bytes,
                   input_type: Optional[str], output_body: bytes, output_type: Optional[str],
                   attributes: Dict, max_payload_bytes: Optional[int] = None) -> Dict:
    truncated: Dict[str, int] = {}
    in_data, in_enc = encode_data(_cut(input_body, max_payload_bytes, "endpointInput", truncated), input_type)
    out_data, out_enc = encode_data(_cut(output_body, max_payload_bytes, "endpointOutput", truncated), output_type)
    if truncated:
        attributes = {**attributes, "truncated": truncated}
    return {
        "captureData": {
            "endpointInput": {"observedContentType": input_type or "", "mode": "INPUT", "data": in_data,
                              "encoding": in_enc},
            "endpointOutput": {"observedContentType": output_type or "", "mode": "OUTPUT", "data": out_data,
                               "encoding": out_enc},
        },
        "eventMetadata": {"eventId": event_id, "inferenceId": inference_id,
                          "inferenceTime": when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z",
                          "customAttributes": attributes},
        "eventVersion": EVENT_VERSION,
    }


class CaptureWriter:
    """Writes capture records of one process; each (variant, hour) gets its own file."""

    def __init__(self, root: str, endpoint_name: str) -> None:
        self.root = root
        self.endpoint_name = endpoint_name
        self.written = 0
        self._queue: "queue.SimpleQueue" = queue.SimpleQueue()
        self._files: Dict[str, Tuple[str, object]] = {}  # variant -> (hour folder, open file)
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="data-capture", daemon=True)
        self._thread.start()

    def write(self, variant: str, when: dt.datetime, record: Dict) -> None:
        if self._closed:
            log.error("data capture is closed; record %s of %s dropped", record["eventMetadata"]["eventId"], variant)
            return
        self._queue.put((variant, when, record))

    def close(self) -> None:
        """Write everything queued so far, then close the files."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(_CLOSE)
        self._thread.join()

    def _file(self, variant: str, when: dt.datetime):
        hour = when.strftime("%Y/%m/%d/%H")
        current = self._files.get(variant)
        if current and current[0] == hour:
            return current[1]
        if current:
            current[1].close()
        folder = os.path.join(self.root, self.endpoint_name, variant, hour)
        os.makedirs(folder, exist_ok=True)
        name = f"{when:%M-%S}-{when.microsecond // 1000:03d}-{uuid.uuid4()}.jsonl"
        f = open(os.path.join(folder, name), "a", encoding="utf-8")
        self._files[variant] = (hour, f)
        return f

    def _drain(self, *first) -> list:
        items = list(first)
        while True:
            try:
                items.append(self._queue.get_nowait())
            except queue.Empty:
                return items

    def _run(self) -> None:
        done = False
        while not done:
            try:
                items = self._drain(self._queue.get(timeout=_FLUSH_SECONDS))
            except queue.Empty:
                continue
            done = any(item is _CLOSE for item in items)
            if done:  # a record queued while close() was running still gets written
                items += self._drain()
            self._write([item for item in items if item is not _CLOSE])
        for _, f in self._files.values():
            f.close()
        self._files.clear()

    def _write(self, items) -> None:
        touched = set()
        for variant, when, record in items:
            try:
                f = self._file(variant, when)
                f.write(json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n")
                touched.add(f)
                self.written += 1
            except Exception:  # a full disk must not take the endpoint down
                log.exception("data capture: could not write a record of %s", variant)
        for f in touched:
            if not f.closed:  # a file of an hour that ended within this batch was closed (and flushed) already
                f.flush()


def utc_now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def new_event_id() -> str:
    return str(uuid.uuid4())
