"""The data-capture writer and codec on their own (the server's use of them is in
test_capture_and_report.py): decoding, writing after close, idle periods, a second writer in the
same hour folder, the writer thread at interpreter exit, UTC times."""
import datetime as dt
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from twotower_lit.serving import capture as cap

REPO = Path(__file__).resolve().parents[2]
WHEN = dt.datetime(2026, 5, 4, 3, 2, 1, 500_000, tzinfo=dt.timezone.utc)


def record(event: str, when: dt.datetime = WHEN) -> dict:
    return cap.capture_record(event, event, when, '{"user_id": "é"}'.encode(), "application/json", b"1,2",
                              "text/csv", {"variant": "v"})


def events_on_disk(root: Path) -> list:
    return sorted(json.loads(line)["eventMetadata"]["eventId"]
                  for f in root.rglob("*.jsonl") for line in f.read_text(encoding="utf-8").splitlines())


def test_decode_gives_back_the_captured_bytes_for_every_encoding():
    for data, content_type, encoding in (('{"a": "é"}'.encode(), "application/json", "JSON"),
                                         (b"1,2\n3", "text/csv; charset=utf-8", "CSV"),
                                         (b"\xff\x00", "application/json", "BASE64"),
                                         (b"raw", "application/octet-stream", "BASE64")):
        text, enc = cap.encode_data(data, content_type)
        assert enc == encoding
        assert cap.decode_data({"data": text, "encoding": enc}) == data
    # media types as clients send them: parameters after the type, structured +json types
    for content_type, encoding in (("text/csv; charset=utf-8; header=present", "CSV"),
                                   ("application/vnd.api+json", "JSON"), ("Application/JSON", "JSON"),
                                   ("text/plain", "BASE64"), (None, "BASE64")):
        assert cap.encode_data(b"1,2", content_type) == (("1,2", encoding) if encoding != "BASE64" else
                                                         ("MSwy", "BASE64")), content_type
    # an entry without data (SageMaker leaves it out for an empty body) is empty in every encoding
    assert cap.decode_data({"encoding": "BASE64"}) == b"" and cap.decode_data({"encoding": "JSON"}) == b""


def test_records_written_after_an_idle_spell_and_after_close(tmp_path, caplog):
    """A record arriving after the writer idled for longer than its flush period is still written
    (before close); one written after close is dropped with an error naming it."""
    writer = cap.CaptureWriter(str(tmp_path), "ep")
    writer.write("v", WHEN, record("first"))
    time.sleep(0.6)  # three flush periods without a record
    writer.write("v", WHEN, record("second"))
    deadline = time.monotonic() + 10
    while writer.written < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert events_on_disk(tmp_path) == ["first", "second"]  # on disk before close
    writer.close()
    with caplog.at_level(logging.ERROR, logger="twotower_lit.serving.capture"):
        writer.write("shadow", WHEN, record("late"))
    assert [r.getMessage() for r in caplog.records] == ["data capture is closed; record late of shadow dropped"]
    writer.close()  # a second close is harmless
    assert writer.written == 2 and events_on_disk(tmp_path) == ["first", "second"]
    text = next(tmp_path.rglob("*.jsonl")).read_bytes().decode("utf-8")
    assert '"data":"{\\"user_id\\": \\"é\\"}"' in text  # JSON bodies kept as UTF-8 text


def test_two_writers_share_an_hour_folder(tmp_path):
    """Two server processes capture into the same hour folder: each its own file, nothing lost."""
    a, b = cap.CaptureWriter(str(tmp_path), "ep"), cap.CaptureWriter(str(tmp_path), "ep")
    a.write("v", WHEN, record("a"))
    a.close()
    b.write("v", WHEN, record("b"))
    b.close()
    assert (a.written, b.written) == (1, 1)
    assert len(list(tmp_path.rglob("*.jsonl"))) == 2 and events_on_disk(tmp_path) == ["a", "b"]


def test_an_unclosed_writer_does_not_keep_the_process_alive(tmp_path):
    """The writer thread must not hold the interpreter open when the server exits without close()
    (here in a process of its own; first the same writer in this one, closed as the server does)."""
    writer = cap.CaptureWriter(str(tmp_path / "here"), "ep")
    writer.write("v", WHEN, record("here"))
    writer.close()
    assert events_on_disk(tmp_path / "here") == ["here"]
    code = ("import datetime as dt, sys; from twotower_lit.serving import capture as cap; "
            f"w = cap.CaptureWriter({str(tmp_path)!r}, 'ep'); w.write('v', cap.utc_now(), "
            "cap.capture_record('e', 'e', cap.utc_now(), b'{}', 'application/json', b'{}', 'application/json', {}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_utc_now_is_an_aware_utc_time_and_event_ids_are_uuids():
    import uuid

    ids = {cap.new_event_id() for _ in range(3)}
    assert len(ids) == 3 and all(str(uuid.UUID(i)) == i for i in ids)
    now = cap.utc_now()
    assert now.tzinfo is dt.timezone.utc
    assert abs((now - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 5


def test_a_record_in_sagemakers_layout_field_by_field():
    rec = cap.capture_record("ev", "inf", WHEN, b'{"user_id": 1}', "application/json", b"", None, {"statusCode": 204})
    assert rec == {
        "captureData": {
            "endpointInput": {"observedContentType": "application/json", "mode": "INPUT",
                              "data": '{"user_id": 1}', "encoding": "JSON"},
            "endpointOutput": {"observedContentType": "", "mode": "OUTPUT", "data": "", "encoding": "BASE64"}},
        "eventMetadata": {"eventId": "ev", "inferenceId": "inf", "inferenceTime": "2026-05-04T03:02:01.500Z",
                          "customAttributes": {"statusCode": 204}},
        "eventVersion": "0"}
    unknown = cap.capture_record("ev", "inf", WHEN, b"x", None, b"{}", "application/json", {})["captureData"]
    assert unknown["endpointInput"]["observedContentType"] == "" and unknown["endpointInput"]["encoding"] == "BASE64"
    assert unknown["endpointOutput"]["observedContentType"] == "application/json"


def test_cutting_keeps_whole_characters_and_at_most_three_bytes_back():
    """A payload over the limit is cut at a character boundary, moving back at most three bytes (a
    UTF-8 character is at most four); bytes that are not text are cut at the limit less those three
    at most; the answer is cut like the request."""
    emoji = "a😀b".encode()  # 1 + 4 + 1 bytes
    for limit, kept in ((1, b"a"), (2, b"a"), (3, b"a"), (4, b"a"), (5, "a😀".encode())):
        rec = cap.capture_record("e", "e", WHEN, emoji, "application/octet-stream", b"", "text/csv", {},
                                 max_payload_bytes=limit)
        assert cap.decode_data(rec["captureData"]["endpointInput"]) == kept, limit
    continuation = b"\x80" * 10  # no character boundary anywhere
    for limit, kept in ((5, 2), (2, 0), (1, 0)):
        rec = cap.capture_record("e", "e", WHEN, continuation, "application/octet-stream", b"", "text/csv", {},
                                 max_payload_bytes=limit)
        assert cap.decode_data(rec["captureData"]["endpointInput"]) == continuation[:kept], limit
    rec = cap.capture_record("e", "e", WHEN, b"{}", "application/json", b"9" * 2000, "text/csv", {"a": 1},
                             max_payload_bytes=1000)
    assert rec["captureData"]["endpointOutput"]["data"] == "9" * 1000
    assert rec["eventMetadata"]["customAttributes"] == {"a": 1, "truncated": {"endpointOutput": 2000}}


def test_a_record_that_cannot_be_written_is_logged_and_the_writer_goes_on(tmp_path, caplog):
    (tmp_path / "ep").write_text("a file where the endpoint's folder should be")
    writer = cap.CaptureWriter(str(tmp_path), "ep")
    with caplog.at_level(logging.ERROR, logger="twotower_lit.serving.capture"):
        writer.write("shadow", WHEN, record("lost"))
        writer.close()
    assert writer.written == 0
    assert [r.getMessage() for r in caplog.records] == ["data capture: could not write a record of shadow"]
    assert caplog.records[0].exc_info is not None  # with the reason
