"""Load generator -> real server with a shadow variant and data capture -> SIGTERM -> every record
on disk in SageMaker's layout -> shadow report with held-out labels."""
import json
import re
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.serving.conftest import NUM_ITEMS, NUM_USERS, capture_files, capture_lines, documented_verdict
from twotower_lit.config import LoadConfig, ShadowReportConfig
from twotower_lit.serving import capture as cap
from twotower_lit.serving.load import parse_user_ids, run, split_user_ids
from twotower_lit.serving.report import build_report, rbo, recall_ndcg, write_report


@pytest.fixture(scope="module")
def prepared_dir(tmp_path_factory):
    """A prepared-data directory matching the random exports: users 1..50 (raw ids 1..50), items
    1..200 (raw ids 1, 11, ...); the test split has positives for users 1..40 only."""
    root = tmp_path_factory.mktemp("prepared")
    pq.write_table(pa.table({"user": pa.array(range(1, NUM_USERS + 1), pa.int32()),
                             "user_id": pa.array(range(1, NUM_USERS + 1), pa.int64())}), root / "users.parquet")
    pq.write_table(pa.table({"item": pa.array(range(1, NUM_ITEMS + 1), pa.int32()),
                             "item_id": pa.array([1 + 10 * j for j in range(NUM_ITEMS)], pa.int64())}),
                   root / "items.parquet")
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, 41), 6)
    items = rng.integers(1, NUM_ITEMS + 1, size=len(users))
    labels = (rng.random(len(users)) < 0.7).astype(np.float32)
    files = {}
    (root / "test").mkdir()
    for n, sl in enumerate((slice(0, 120), slice(120, None))):
        name = f"test/part-{n:05d}.parquet"
        pq.write_table(pa.table({"user": pa.array(users[sl], pa.int32()), "item": pa.array(items[sl], pa.int32()),
                                 "label": pa.array(labels[sl])}), root / name)
        files[name] = {"rows": int(len(users[sl]))}
    (root / "manifest.json").write_text(json.dumps({"schema_version": 1, "files": files}))
    return root


def test_replay_users_come_from_the_test_split(prepared_dir, tmp_path):
    assert split_user_ids(str(prepared_dir), "test").tolist() == list(range(1, 41))
    (tmp_path / "ids.txt").write_text("3\n5,7 9\n")
    assert parse_user_ids("@" + str(tmp_path / "ids.txt")).tolist() == [3, 5, 7, 9]
    assert parse_user_ids("1,2").tolist() == [1, 2]


def test_capture_counts_match_requests_and_report(model_dir, shadow_model_dir, prepared_dir, start_server, tmp_path):
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", shadow_model_dir,
                           "--capture-dir", str(capture), "--endpoint-name", "movies", "--shadow-max-in-flight", "64"])
    summary = run(LoadConfig(url=server.url + "/invocations", data_dir=str(prepared_dir), rate=0, concurrency=4,
                             requests=240, duration=60, k=10))
    assert summary["requests"] == 240 and summary["ok"] == 240, summary
    assert summary["achieved_rps"] > 0 and summary["latency_ms"]["p99"] >= summary["latency_ms"]["p50"] > 0
    import httpx
    bad = httpx.post(server.url + "/invocations", content=b"\xff", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400
    n = 241
    assert server.stop() == 0

    production = [json.loads(line) for line in capture_lines(capture, "production")]
    shadow = [json.loads(line) for line in capture_lines(capture, "shadow")]
    assert len(production) == n and len(shadow) == n
    files = capture_files(capture, "production") + capture_files(capture, "shadow")
    layout = re.compile(r"movies/(production|shadow)/\d{4}/\d{2}/\d{2}/\d{2}/\d{2}-\d{2}-\d{3}-[0-9a-f-]{36}\.jsonl$")
    assert files and all(layout.search(f.as_posix()) for f in files), files
    ids = {r["eventMetadata"]["eventId"]: r["eventMetadata"]["inferenceId"] for r in production}
    assert ids == {r["eventMetadata"]["eventId"]: r["eventMetadata"]["inferenceId"] for r in shadow}
    for rec in production + shadow:
        data = rec["captureData"]
        assert rec["eventVersion"] == "0"
        assert data["endpointInput"]["mode"] == "INPUT" and data["endpointOutput"]["mode"] == "OUTPUT"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", rec["eventMetadata"]["inferenceTime"])
        attrs = rec["eventMetadata"]["customAttributes"]
        assert attrs["latencyMs"] >= 0 and attrs["statusCode"] in (200, 400)
    binary = [r for r in production if r["captureData"]["endpointInput"]["encoding"] == "BASE64"]
    assert len(binary) == 1 and cap.decode_data(binary[0]["captureData"]["endpointInput"]) == b"\xff"
    assert all(r["captureData"]["endpointInput"]["encoding"] == "JSON" for r in production if r not in binary)

    cfg = ShadowReportConfig(capture_dir=str(capture), data_dir=str(prepared_dir), min_requests=200,
                             min_labelled_users=10, bootstrap=200)
    report = write_report(cfg)
    assert report["joined_requests"] == n
    prod, shad = report["variants"]["production"], report["variants"]["shadow"]
    assert prod["requests"] == shad["requests"] == n and prod["client_errors"] == shad["client_errors"] == 1
    assert prod["server_errors"] == shad["server_errors"] == 0
    assert 0 < prod["model_latency_ms"]["p50"] <= prod["model_latency_ms"]["p99"]
    assert sum(prod["model_latency_histogram"]["counts"]) == sum(shad["model_latency_histogram"]["counts"]) == 240
    assert report["agreement"]["pairs"] == 240 and report["agreement"]["k"] == 10
    assert 0 <= report["agreement"]["mean_rbo"] < 1, "two different random models disagree"
    q = report["quality"]
    assert q["labelled_users"] == 240 and 0 <= q["production"]["recall@k"] <= 1
    assert report["verdict"] == documented_verdict(report) and report["reasons"]
    for path in report["files"]:
        with open(path, "rb") as f:
            head = f.read(8)
        assert head == b"\x89PNG\r\n\x1a\n" if path.endswith(".png") else len(head) > 0
    assert "Verdict" in open(report["files"][1]).read()


def _event(capture_dir, variant, role, event_id, user, items, status=200, latency=1.0):
    when = cap.utc_now()
    body = json.dumps({"predictions": [{"user_id": user, "source": "model",
                                        "items": [{"id": i, "title": "", "genres": [], "score": 1.0 - r / 100}
                                                  for r, i in enumerate(items)]}]}).encode()
    rec = cap.capture_record(event_id, event_id, when, json.dumps({"user_id": user}).encode(), "application/json",
                             body if status == 200 else b"", "application/json",
                             {"variant": variant, "role": role, "statusCode": status, "latencyMs": latency,
                              "modelLatencyMs": latency})
    folder = capture_dir / "ep" / variant / when.strftime("%Y/%m/%d/%H")
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "x.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


def _positives_dir(tmp_path, users, positive_items):
    root = tmp_path / "prep"
    (root / "test").mkdir(parents=True)
    ids = sorted(set(positive_items) | {999})
    pq.write_table(pa.table({"user": pa.array(users, pa.int32()), "user_id": pa.array(users, pa.int64())}),
                   root / "users.parquet")
    pq.write_table(pa.table({"item": pa.array(ids, pa.int32()), "item_id": pa.array(ids, pa.int64())}),
                   root / "items.parquet")
    rows_u = [u for u in users for _ in positive_items]
    rows_i = [i for _ in users for i in positive_items]
    pq.write_table(pa.table({"user": pa.array(rows_u, pa.int32()), "item": pa.array(rows_i, pa.int32()),
                             "label": pa.array([1.0] * len(rows_u), pa.float32())}), root / "test" / "part-0.parquet")
    (root / "manifest.json").write_text(json.dumps({"files": {"test/part-0.parquet": {}}}))
    return str(root)


@pytest.mark.parametrize("case,expected", [("identical", "keep"), ("better", "promote"), ("worse", "keep"),
                                           ("shadow_errors", "keep"), ("slow", "keep"), ("few", "inconclusive")])
def test_verdicts(case, expected, tmp_path):
    capture = tmp_path / "capture"
    users = list(range(1, 61))
    positives = [1, 2, 3]
    n = 10 if case == "few" else 60
    for u in users[:n]:
        prod_items = [1, 50, 51, 52, 53] if u % 2 else [50, 51, 52, 53, 54]
        shadow_items = {"better": [1, 2, 3, 50, 51], "worse": [60, 61, 62, 63, 64]}.get(case, prod_items)
        _event(capture, "A", "production", f"e{u}", u, prod_items)
        status = 500 if case == "shadow_errors" and u % 3 == 0 else 200
        _event(capture, "B", "shadow", f"e{u}", u, shadow_items, status=status, latency=5.0 if case == "slow" else 1.0)
    cfg = ShadowReportConfig(capture_dir=str(capture), data_dir=_positives_dir(tmp_path, users, positives),
                             min_requests=50, min_labelled_users=50, bootstrap=300)
    report = build_report(cfg)
    assert report["verdict"] == expected == documented_verdict(report), report["reasons"]
    if case == "identical":
        assert report["agreement"]["mean_rbo"] == pytest.approx(1.0) and report["agreement"]["mean_overlap"] == 1.0


def test_report_figures_show_the_verdicts_interval_and_keep_variants_apart(tmp_path):
    """The figures of a report whose shadow is better for half of the users: the interval panel
    shows the report's own mean and 95% interval against 0 and the equivalence margin; the
    agreement measures have a panel each; the latency histograms are outlines (neither hides the other)."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Polygon

    from twotower_lit.serving.report import agreement_figure, interval_figure, latency_figure

    capture = tmp_path / "capture"
    users = list(range(1, 61))
    for u in users:
        _event(capture, "A", "production", f"e{u}", u, [50, 51, 52, 53, 54], latency=1.0 + (u % 7) / 10)
        _event(capture, "B", "shadow", f"e{u}", u, [1, 2, 50, 51, 52] if u % 2 else [50, 51, 52, 53, 54],
               latency=1.0 + (u % 5) / 10)
    cfg = ShadowReportConfig(capture_dir=str(capture), data_dir=_positives_dir(tmp_path, users, [1, 2, 3]),
                             min_requests=50, min_labelled_users=50, bootstrap=300)
    report = build_report(cfg)
    q = report["quality"]
    lo, hi = q["ndcg_diff_ci95"]
    assert 0 < lo < q["ndcg_diff"] < hi and report["verdict"] == "promote"

    fig = interval_figure(report)
    (ax,) = fig.axes
    (bar,) = ax.containers
    (segment,) = bar.lines[2][0].get_segments()
    assert segment[0][0] == pytest.approx(lo) and segment[1][0] == pytest.approx(hi)
    assert bar.lines[0].get_xdata()[0] == pytest.approx(q["ndcg_diff"])
    assert [line.get_xdata()[0] for line in ax.lines if line is not bar.lines[0] and
            line not in bar.lines[1]] == [0.0]
    (band,) = [p for p in ax.patches if p.get_label().startswith("equivalence margin")]
    xs = band.get_path().transformed(band.get_patch_transform()).vertices[:, 0] if hasattr(band, "get_x") \
        else band.get_xy()[:, 0]
    assert min(xs) == pytest.approx(-cfg.equivalence_margin) and max(xs) == pytest.approx(cfg.equivalence_margin)
    assert ax.get_xlim()[0] < -cfg.equivalence_margin and ax.get_xlim()[1] > hi
    assert "PROMOTE" in ax.get_title()
    plt.close(fig)

    fig = agreement_figure(report)
    assert [ax.get_title() for ax in fig.axes] == ["overlap@k (shared items / k)", "RBO (p=0.9, rank-weighted)"]
    for ax, key in zip(fig.axes, ("overlap", "rbo")):
        assert sum(p.get_height() for p in ax.patches) == len(report["_rows"]) == 60
        assert ax.lines[0].get_xdata()[0] == pytest.approx(np.mean([r[key] for r in report["_rows"]]))
    plt.close(fig)

    fig = latency_figure(report)
    outlines = [p for p in fig.axes[0].patches if isinstance(p, Polygon)]
    assert len(outlines) == 2 and not any(p.get_fill() for p in outlines)
    plt.close(fig)

    # without held-out labels there is no interval, and the figure says so
    fig = interval_figure(dict(report, quality=None, verdict="inconclusive"))
    assert not fig.axes[0].containers and "no held-out labels" in fig.axes[0].texts[0].get_text()
    plt.close(fig)


def test_agreement_and_quality_formulas():
    assert rbo([1, 2, 3], [1, 2, 3]) == pytest.approx(1.0)
    assert rbo([1, 2, 3], [4, 5, 6]) == 0.0
    assert 0 < rbo([1, 2, 3], [3, 2, 1]) < 1
    assert rbo([1, 2, 3, 4], [1, 2, 4, 3]) > rbo([1, 2, 3, 4], [2, 1, 3, 4])  # top ranks weigh more
    recall, ndcg = recall_ndcg([5, 1, 7], {1, 9}, 3)
    assert recall == 0.5 and ndcg == pytest.approx((1 / np.log2(3)) / (1 + 1 / np.log2(3)))


def test_shadow_report_cli(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    capture = tmp_path / "capture"
    for u in range(1, 31):
        _event(capture, "A", "production", f"e{u}", u, [1, 2, 3])
        _event(capture, "B", "shadow", f"e{u}", u, [1, 3, 2])
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "entrypoints.shadow_report", "--capture-dir", str(capture),
                           "--output-dir", str(out), "--min-requests", "10"], cwd=repo, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("verdict: inconclusive (no held-out labels")
    assert sorted(p.name for p in out.iterdir()) == ["agreement.png", "interval.png", "latency.png", "report.json",
                                                     "report.md"]
    assert "![NDCG@k difference interval](interval.png)" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["agreement"]["mean_overlap"] == 1.0 and 0 < report["agreement"]["mean_rbo"] < 1
    bad = subprocess.run([sys.executable, "-m", "entrypoints.shadow_report", "--capture-dir", str(tmp_path / "none")],
                         cwd=repo, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "expected one endpoint folder" in bad.stderr


def test_two_worker_processes_serve_and_capture(model_dir, start_server, tmp_path):
    import asyncio

    import httpx

    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--workers", "2", "--capture-dir", str(capture)])

    async def send():
        async def one_client(users):
            async with httpx.AsyncClient(timeout=30) as client:
                return [(await client.post(server.url + "/invocations", json={"user_id": u})).status_code
                        for u in users]

        return await asyncio.gather(*(one_client(range(i, i + 5)) for i in (1, 11, 21, 31)))

    statuses = [s for part in asyncio.run(send()) for s in part]
    assert statuses == [200] * 20
    assert server.stop() == 0
    records = [json.loads(line) for line in capture_lines(capture, "production")]
    assert sorted(json.loads(r["captureData"]["endpointInput"]["data"])["user_id"] for r in records) == \
        sorted(u for i in (1, 11, 21, 31) for u in range(i, i + 5))


def test_capture_record_cuts_large_payloads_and_says_so():
    when = cap.utc_now()
    text = ("\u00e9" * 600).encode("utf-8")  # 1200 bytes of two-byte characters
    rec = cap.capture_record("e", "i", when, text, "application/json", b"x" * 50, "application/json",
                             {"statusCode": 400}, max_payload_bytes=1001)
    entry = rec["captureData"]["endpointInput"]
    assert entry["encoding"] == "JSON" and entry["data"] == "\u00e9" * 500  # cut at a character boundary
    assert rec["eventMetadata"]["customAttributes"] == {"statusCode": 400, "truncated": {"endpointInput": 1200}}
    assert rec["captureData"]["endpointOutput"]["data"] == "x" * 50
    binary = cap.capture_record("e", "i", when, b"\xff" * 5000, "application/octet-stream", b"", "", {},
                                max_payload_bytes=1000)
    assert cap.decode_data(binary["captureData"]["endpointInput"]) == b"\xff" * 1000
    assert binary["eventMetadata"]["customAttributes"] == {"truncated": {"endpointInput": 5000}}
    whole = cap.capture_record("e", "i", when, b"{}", "application/json", b"{}", "application/json", {},
                               max_payload_bytes=2)
    assert "truncated" not in whole["eventMetadata"]["customAttributes"]


def test_large_payloads_are_captured_cut_for_both_variants(model_dir, shadow_model_dir, start_server, tmp_path):
    """A 5 MB garbage body (400) and a large answer (200) against a 64 KiB capture limit: every
    record is written, cut, and says how large the payload was; small ones are whole."""
    import httpx

    limit = 65536
    capture = tmp_path / "capture"
    server = start_server(["--model-dir", model_dir, "--shadow-model-dir", shadow_model_dir,
                           "--capture-dir", str(capture), "--shadow-timeout", "10"],
                          env={"TWOTOWER_CAPTURE_MAX_PAYLOAD_BYTES": str(limit)})
    garbage = b'{"user_id": "' + b"x" * (5 * 1024 * 1024) + b'"}'
    big = httpx.post(server.url + "/invocations", content=garbage, headers={"Content-Type": "application/json"},
                     timeout=30)
    assert big.status_code == 400
    answer = httpx.post(server.url + "/invocations", json={"inputs": list(range(1, 41)), "k": 100}, timeout=30)
    assert answer.status_code == 200 and len(answer.content) > limit
    small = httpx.post(server.url + "/invocations", json={"user_id": 3}, timeout=30)
    assert small.status_code == 200
    assert server.stop() == 0
    for variant in ("production", "shadow"):
        files = capture_files(capture, variant)
        assert sum(f.stat().st_size for f in files) < 4 * limit + 20000, "captured whole"
        records = [json.loads(line) for line in capture_lines(capture, variant)]
        assert len(records) == 3, variant
        # the shadow's calls may finish out of order: tell the three apart by what they hold
        (cut_input,) = [r for r in records if r["eventMetadata"]["customAttributes"]["statusCode"] == 400]
        (cut_output,) = [r for r in records if r["eventMetadata"]["customAttributes"]["statusCode"] == 200
                         and "truncated" in r["eventMetadata"]["customAttributes"]]
        (whole,) = [r for r in records if r is not cut_input and r is not cut_output]
        attrs = cut_input["eventMetadata"]["customAttributes"]
        assert attrs["statusCode"] == 400 and attrs["truncated"] == {"endpointInput": len(garbage)}
        assert len(cap.decode_data(cut_input["captureData"]["endpointInput"])) == limit
        out_attrs = cut_output["eventMetadata"]["customAttributes"]
        assert out_attrs["statusCode"] == 200 and set(out_attrs["truncated"]) == {"endpointOutput"}
        assert out_attrs["truncated"]["endpointOutput"] > limit
        assert len(cap.decode_data(cut_output["captureData"]["endpointOutput"])) <= limit
        assert json.loads(cap.decode_data(whole["captureData"]["endpointOutput"]))["predictions"]
    assert build_report(ShadowReportConfig(capture_dir=str(capture), min_requests=1))["agreement"][
        "truncated_requests"] == 1



@pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")
def test_capture_files_rotate_every_utc_hour_per_variant(tmp_path):
    """Records an hour apart go to two files in two hour folders (also across midnight); records of
    one hour and variant share one file; each variant has its own files. File names carry the first
    record's minute, second and millisecond. The records are built first and queued at once, so the
    writer thread takes them in a batch that crosses the hours (closing a file it wrote to in that
    batch), and it must go on writing what comes after."""
    from datetime import datetime, timezone

    times = {"a": datetime(2026, 3, 1, 10, 59, 59, 999_000, tzinfo=timezone.utc),
             "b": datetime(2026, 3, 1, 11, 0, 0, 0, tzinfo=timezone.utc),
             "c": datetime(2026, 3, 1, 11, 30, 5, 250_000, tzinfo=timezone.utc),
             "d": datetime(2026, 3, 1, 23, 59, 0, tzinfo=timezone.utc),
             "e": datetime(2026, 3, 2, 0, 0, 1, tzinfo=timezone.utc),
             "f": datetime(2026, 3, 2, 0, 59, 59, 999_000, tzinfo=timezone.utc)}
    records = [(variant, when, cap.capture_record(event, event, when, b'{"user_id": 1}', "application/json", b"{}",
                                                  "application/json", {"variant": variant}))
               for event, when in times.items() for variant in ("production", "shadow")]
    writer = cap.CaptureWriter(str(tmp_path), "ep")
    for item in records[:-2]:
        writer.write(*item)
    deadline = time.monotonic() + 10
    while writer.written < len(records) - 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    for item in records[-2:]:  # after the batch that crossed the hours was written
        writer.write(*item)
    writer.close()
    assert writer.written == len(records) == 12
    for variant in ("production", "shadow"):
        got = {}
        for f in sorted((tmp_path / "ep" / variant).rglob("*.jsonl")):
            rel = f.relative_to(tmp_path / "ep" / variant)
            events = [json.loads(line)["eventMetadata"]["eventId"] for line in f.read_text().splitlines()]
            got[(str(rel.parent), rel.name[:9])] = events
        assert got == {("2026/03/01/10", "59-59-999"): ["a"], ("2026/03/01/11", "00-00-000"): ["b", "c"],
                       ("2026/03/01/23", "59-00-000"): ["d"], ("2026/03/02/00", "00-01-000"): ["e", "f"]}
