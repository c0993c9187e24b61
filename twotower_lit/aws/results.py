"""Shadow-test results from SageMaker: traffic through sagemaker-runtime, data capture from S3,
CloudWatch metrics per variant, and the same report the local stack produces.

SageMaker's data capture writes ``s3://DEST/<endpoint>/<variant>/yyyy/mm/dd/hh/*.jsonl`` in the
format the local server imitates (`twotower_lit.serving.capture`), minus what only the local
server knows: per-request status and latency (``customAttributes``). `collect_capture` downloads
the files into the local layout and completes each record so `twotower_lit.serving.report` reads
it: the variant's role (production or shadow, from the test's variant names), the status (200 for
a captured predictions payload; an error payload's own status; otherwise 0, counted as an error)
and ``eventId`` = the request's ``inferenceId`` (which the load generator sets on every request),
so the production and shadow records of one request join. Latency comes from CloudWatch instead
(``ModelLatency``/``OverheadLatency`` per variant), written beside the report.
"""
from __future__ import annotations

import datetime as dt
import glob
import json
import logging
import os
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

from twotower_lit.aws.s3 import download_prefix
from twotower_lit.aws.session import AwsContext

log = logging.getLogger(__name__)

NAMESPACE = "AWS/SageMaker"
COUNT_METRICS = ("Invocations", "Invocation4XXErrors", "Invocation5XXErrors")
LATENCY_METRICS = ("ModelLatency", "OverheadLatency")  # microseconds
PERCENTILES = ("p50", "p90", "p99")


# traffic ---------------------------------------------------------------------------------------

def runtime_sender(ctx: AwsContext, endpoint: str):
    """A load-generator sender (`twotower_lit.serving.load.sync_sender`) that calls
    ``sagemaker-runtime invoke_endpoint`` with a fresh InferenceId per request."""
    from twotower_lit.serving.load import sync_sender

    runtime = ctx.client("sagemaker-runtime")

    def call(body: bytes, content_type: str) -> int:
        response = runtime.invoke_endpoint(EndpointName=endpoint, Body=body, ContentType=content_type,
                                           Accept="application/json", InferenceId=str(uuid.uuid4()))
        response["Body"].read()
        return response["ResponseMetadata"]["HTTPStatusCode"]

    return sync_sender(call)


# data capture ----------------------------------------------------------------------------------

def _status(record: Dict) -> int:
    from twotower_lit.serving.capture import decode_data

    try:
        payload = json.loads(decode_data(record["captureData"]["endpointOutput"]))
    except (KeyError, ValueError, TypeError):
        return 0
    if isinstance(payload, dict) and isinstance(payload.get("predictions"), list):
        return 200
    error = payload.get("error") if isinstance(payload, dict) else None
    return int(error.get("status", 0)) if isinstance(error, dict) else 0


def normalise_record(record: Dict, variant: str, role: str) -> Dict:
    """A SageMaker capture record completed with what the shadow report reads (see module doc)."""
    meta = record.setdefault("eventMetadata", {})
    attrs = meta.get("customAttributes")
    attrs = dict(attrs) if isinstance(attrs, dict) else ({"sagemakerCustomAttributes": attrs} if attrs else {})
    attrs.setdefault("variant", variant)
    attrs.setdefault("role", role)
    attrs.setdefault("statusCode", _status(record))
    if meta.get("inferenceId"):
        attrs.setdefault("sagemakerEventId", meta.get("eventId"))
        meta["eventId"] = meta["inferenceId"]
    meta["customAttributes"] = attrs
    return record


def collect_capture(ctx: AwsContext, capture_uri: str, endpoint: str, local_dir: str,
                    roles: Dict[str, str]) -> Dict[str, int]:
    """Download the endpoint's capture files into ``local_dir/<endpoint>/<variant>/...`` and
    normalise them for the report; `roles` maps variant name -> 'production' | 'shadow'.
    Returns records per variant."""
    uri = capture_uri.rstrip("/") + "/" + endpoint
    counts: Dict[str, int] = {}
    with tempfile.TemporaryDirectory() as raw:
        for path in download_prefix(ctx.s3, uri, raw, keep=lambda rel: rel.endswith(".jsonl")):
            _normalise_file(path, os.path.relpath(path, raw), uri, os.path.join(local_dir, endpoint), roles, counts)
    return counts


def _normalise_file(path: str, rel: str, uri: str, out_root: str, roles: Dict[str, str],
                    counts: Dict[str, int]) -> None:
    """Normalise one downloaded capture file into `out_root` (same relative path)."""
    variant = rel.split(os.sep)[0]
    if variant not in roles:
        log.warning("capture of unknown variant %s (%s) skipped", variant, rel)
        return
    out = os.path.join(out_root, rel)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(path, encoding="utf-8") as src, open(out, "w", encoding="utf-8") as dst:
        for n, line in enumerate(src, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{uri}/{rel.replace(os.sep, '/')}:{n}: not JSON ({e})") from None
            dst.write(json.dumps(normalise_record(record, variant, roles[variant]), separators=(",", ":")) + "\n")
            counts[variant] = counts.get(variant, 0) + 1


def capture_time_range(local_dir: str, endpoint: str) -> Optional[Tuple[dt.datetime, dt.datetime]]:
    """(first, last) inferenceTime of an endpoint's captured records, or None when there are none."""
    times = []
    for path in glob.glob(os.path.join(local_dir, endpoint, "**", "*.jsonl"), recursive=True):
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    when = json.loads(line)["eventMetadata"].get("inferenceTime")
                    if when:
                        times.append(dt.datetime.fromisoformat(when.replace("Z", "+00:00")))
    return (min(times), max(times)) if times else None


# CloudWatch ------------------------------------------------------------------------------------

def metric_queries(endpoint: str, variants: Sequence[str], period: int,
                   percentiles: Sequence[str] = PERCENTILES) -> List[Dict[str, Any]]:
    """GetMetricData queries: per variant, counts (Sum) and latencies (Average, Maximum, percentiles)."""
    queries = []
    for i, variant in enumerate(variants):
        dims = [{"Name": "EndpointName", "Value": endpoint}, {"Name": "VariantName", "Value": variant}]
        stats = [(m, "Sum") for m in COUNT_METRICS]
        stats += [(m, s) for m in LATENCY_METRICS for s in ("Average", "Maximum", *percentiles)]
        for metric, stat in stats:
            queries.append({"Id": f"v{i}_{metric.lower()}_{stat.lower()}",
                            "Label": f"{variant}|{metric}|{stat}",
                            "MetricStat": {"Metric": {"Namespace": NAMESPACE, "MetricName": metric, "Dimensions": dims},
                                           "Period": period, "Stat": stat},
                            "ReturnData": True})
    return queries


def variant_metrics(ctx: AwsContext, endpoint: str, variants: Sequence[str], start: dt.datetime, end: dt.datetime,
                    period: int = 60, percentiles: Sequence[str] = PERCENTILES) -> Dict[str, Dict]:
    """``{variant: {metric: {stat: {"timestamps": [...], "values": [...]}}}}``; latencies in ms."""
    cw = ctx.client("cloudwatch")
    queries = metric_queries(endpoint, variants, period, percentiles)
    out: Dict[str, Dict] = {v: {} for v in variants}
    for lo in range(0, len(queries), 500):
        kwargs = dict(MetricDataQueries=queries[lo:lo + 500], StartTime=start, EndTime=end, ScanBy="TimestampAscending")
        while True:
            page = cw.get_metric_data(**kwargs)
            for result in page["MetricDataResults"]:
                variant, metric, stat = result["Label"].split("|")
                scale = 1e-3 if metric in LATENCY_METRICS else 1.0
                series = out[variant].setdefault(metric, {}).setdefault(stat, {"timestamps": [], "values": []})
                series["timestamps"] += [t.isoformat() for t in result["Timestamps"]]
                series["values"] += [v * scale for v in result["Values"]]
            if not page.get("NextToken"):
                break
            kwargs["NextToken"] = page["NextToken"]
    return out


def summarise_metrics(metrics: Dict[str, Dict]) -> Dict[str, Dict]:
    """Per variant: total invocations and errors, and latency (ms) weighted over the periods."""
    summary = {}
    for variant, m in metrics.items():
        inv = m.get("Invocations", {}).get("Sum", {}).get("values", [])
        row: Dict[str, Any] = {"invocations": sum(inv),
                               "4xx": sum(m.get("Invocation4XXErrors", {}).get("Sum", {}).get("values", [])),
                               "5xx": sum(m.get("Invocation5XXErrors", {}).get("Sum", {}).get("values", []))}
        for metric in LATENCY_METRICS:
            stats = m.get(metric, {})
            avg = stats.get("Average", {}).get("values", [])
            key = metric[0].lower() + metric[1:] + "_ms"
            peaks = stats.get("Maximum", {}).get("values", [])
            row[key] = {"mean_of_periods": sum(avg) / len(avg) if avg else None, "max": max(peaks) if peaks else None}
            for p in PERCENTILES:
                vals = stats.get(p, {}).get("values", [])
                if vals:
                    row[key][f"worst_period_{p}"] = max(vals)
        summary[variant] = row
    return summary


def plot_metrics(metrics: Dict[str, Dict], path: str) -> str:
    """Invocations and mean model latency per variant over time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for variant, m in metrics.items():
        for ax, (metric, stat) in zip(axes, (("Invocations", "Sum"), ("ModelLatency", "Average"))):
            series = m.get(metric, {}).get(stat, {})
            if series.get("values"):
                ts = [dt.datetime.fromisoformat(t) for t in series["timestamps"]]
                ax.plot(ts, series["values"], marker="o", label=variant)
    axes[0].set(title="invocations per period", ylabel="requests")
    axes[1].set(title="model latency (mean per period)", ylabel="ms")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no datapoints", ha="center", va="center", transform=ax.transAxes)
        ax.tick_params(axis="x", labelrotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# the report ------------------------------------------------------------------------------------

def shadow_report(ctx: AwsContext, endpoint: str, capture_uri: str, roles: Dict[str, str], report_cfg,
                  period: int = 60, percentiles: Sequence[str] = PERCENTILES) -> Dict[str, Any]:
    """Collect the capture and the CloudWatch metrics, write the shadow report
    (`twotower_lit.serving.report.write_report`, into ``report_cfg.output_dir``) plus
    ``cloudwatch.json`` and ``cloudwatch.png``. ``report_cfg.capture_dir`` is where the capture is
    downloaded to."""
    from dataclasses import replace

    from twotower_lit.serving.report import write_report

    capture_dir = report_cfg.capture_dir
    counts = collect_capture(ctx, capture_uri, endpoint, capture_dir, roles)
    if not counts:
        raise RuntimeError(f"no data capture under {capture_uri.rstrip('/')}/{endpoint}/ yet (SageMaker writes it "
                           "a few minutes after the requests)")
    report = write_report(replace(report_cfg, endpoint_name=endpoint))
    out_dir = report_cfg.output_dir or os.path.join(capture_dir, "report")
    first, last = capture_time_range(capture_dir, endpoint)
    start = first - dt.timedelta(seconds=period)
    end = last + dt.timedelta(seconds=2 * period)
    metrics = variant_metrics(ctx, endpoint, sorted(roles), start, end, period, percentiles)
    cloudwatch = {"period_s": period, "start": start.isoformat(), "end": end.isoformat(),
                  "roles": roles, "summary": summarise_metrics(metrics), "series": metrics}
    with open(os.path.join(out_dir, "cloudwatch.json"), "w") as f:
        json.dump(cloudwatch, f, indent=1)
    files = [*report["files"], os.path.join(out_dir, "cloudwatch.json"),
             plot_metrics(metrics, os.path.join(out_dir, "cloudwatch.png"))]
    return {**report, "captured": counts, "cloudwatch": cloudwatch["summary"], "files": files}
