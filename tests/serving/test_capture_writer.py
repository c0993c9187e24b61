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
    """The writer thread must not hold the interpreter open when the server exits without close()."""
    code = ("import datetime as dt, sys; from twotower_lit.serving import capture as cap; "
            f"w = cap.CaptureWriter({str(tmp_path)!r}, 'ep'); w.write('v', cap.utc_now(), "
            "cap.capture_record('e', 'e', cap.utc_now(), b'{}', 'application/json', b'{}', 'application/json', {}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_utc_now_is_an_aware_utc_time():
    now = cap.utc_now()
    assert now.tzinfo is dt.timezone.utc
    assert abs((now - dt.datetime.now(dt.timezone.utc)).total_seconds()) < 5
