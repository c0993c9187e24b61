"""Shadow-test report from data capture: latency, errors, agreement, held-out quality, a verdict.

Reads ``<capture>/<endpoint>/<variant>/**/*.jsonl`` (`twotower_lit.serving.capture`), joins the
production and shadow records of each request by eventId, and computes per variant: requests,
errors (5xx and no-answer; 4xx are the caller's and counted apart), model latency percentiles
and distribution; for the joined requests, per user: overlap@k, Jaccard, rank-biased overlap and
the Spearman correlation of the scores of shared items; with a prepared data directory, Recall@k
and NDCG@k against the test split's positives (label 1), and the paired NDCG@k difference with a
bootstrap 95% interval.

Verdict, in this order:
  inconclusive  fewer than ``min_requests`` joined requests
  keep          shadow error rate > production's + ``max_error_rate_increase``, or shadow p99
                model latency > ``max_latency_ratio`` x production's
  inconclusive  fewer than ``min_labelled_users`` users with held-out positives answered by both
  promote       NDCG@k difference (shadow - production) interval entirely above 0
  keep          interval entirely below 0, or inside +-``equivalence_margin`` (no gain worth a change)
  inconclusive  otherwise (more traffic needed); also when there are no labels to judge quality by
"""
from __future__ import annotations

import glob
import json
import math
import os
from collections import Counter, defaultdict
from dataclasses import asdict
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from twotower_lit.config import ShadowReportConfig
from twotower_lit.serving.capture import decode_data

PRODUCTION, SHADOW = "production", "shadow"


# reading ---------------------------------------------------------------------------------------

def read_capture(capture_dir: str, endpoint: Optional[str] = None) -> Tuple[str, Dict[str, Dict[str, Dict]]]:
    """(endpoint, {role: {eventId: record}})."""
    endpoints = sorted(d for d in os.listdir(capture_dir) if os.path.isdir(os.path.join(capture_dir, d))
                       and d != "report") if os.path.isdir(capture_dir) else []
    if endpoint is None:
        if len(endpoints) != 1:
            raise ValueError(f"{capture_dir}: expected one endpoint folder, found {endpoints}; pass --endpoint-name")
        endpoint = endpoints[0]
    records: Dict[str, Dict[str, Dict]] = defaultdict(dict)
    for path in sorted(glob.glob(os.path.join(capture_dir, endpoint, "*", "*", "*", "*", "*", "*.jsonl"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    attrs = rec["eventMetadata"].get("customAttributes") or {}
                    role = attrs.get("role") or (PRODUCTION if "shadow" not in path.split(os.sep)[-6] else SHADOW)
                    records[role][rec["eventMetadata"]["eventId"]] = rec
                except (ValueError, KeyError, TypeError) as e:
                    raise ValueError(f"{path}:{n}: not a data-capture record ({e})") from None
    return endpoint, records


def _attrs(rec: Dict) -> Dict:
    return rec["eventMetadata"].get("customAttributes") or {}


def _predictions(rec: Dict) -> Optional[List[Dict]]:
    out = rec["captureData"]["endpointOutput"]
    if _attrs(rec).get("statusCode") != 200:
        return None
    try:
        return json.loads(decode_data(out))["predictions"]
    except (ValueError, KeyError, TypeError):
        return None


def test_positives(data_dir: str) -> Dict[int, set]:
    """raw user id -> raw item ids with label 1 in the prepared test split."""
    import pyarrow.parquet as pq

    with open(os.path.join(data_dir, "manifest.json")) as f:
        manifest = json.load(f)
    shards = sorted(p for p in manifest.get("files", {}) if p.startswith("test/"))
    if not shards:
        raise ValueError(f"{data_dir}/manifest.json lists no test/ shards")
    users = pq.read_table(os.path.join(data_dir, "users.parquet"), columns=["user", "user_id"])
    items = pq.read_table(os.path.join(data_dir, "items.parquet"), columns=["item", "item_id"])
    uid = dict(zip(users.column("user").to_pylist(), users.column("user_id").to_pylist()))
    iid = dict(zip(items.column("item").to_pylist(), items.column("item_id").to_pylist()))
    out: Dict[int, set] = defaultdict(set)
    for p in shards:
        t = pq.read_table(os.path.join(data_dir, p), columns=["user", "item", "label"])
        keep = t.column("label").to_numpy() == 1
        for u, i in zip(t.column("user").to_numpy()[keep], t.column("item").to_numpy()[keep]):
            out[int(uid[int(u)])].add(int(iid[int(i)]))
    return dict(out)


# metrics ---------------------------------------------------------------------------------------

def rbo(a: Sequence, b: Sequence, p: float = 0.9) -> float:
    """Rank-biased overlap (Webber et al. 2010), extrapolated to the lists' depth; 1 = identical."""
    k = min(len(a), len(b))
    if k == 0:
        return 1.0 if len(a) == len(b) else 0.0
    seen_a, seen_b, overlap, total = set(), set(), 0, 0.0
    for d in range(1, k + 1):
        x, y = a[d - 1], b[d - 1]
        if x == y:
            overlap += 1
        else:
            overlap += (x in seen_b) + (y in seen_a)
        seen_a.add(x)
        seen_b.add(y)
        total += (overlap / d) * p ** d
    return float((1 - p) / p * total + (overlap / k) * p ** k)


def spearman(x: Sequence[float], y: Sequence[float]) -> Optional[float]:
    if len(x) < 3:
        return None
    rx, ry = np.argsort(np.argsort(x)), np.argsort(np.argsort(y))
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def recall_ndcg(ranked: Sequence[int], positives: set, k: int) -> Tuple[float, float]:
    """Recall@k and NDCG@k of a ranked list (the protocol of `twotower_lit.metrics`)."""
    hits = [1.0 if item in positives else 0.0 for item in ranked[:k]]
    dcg = sum(h / math.log2(r + 2) for r, h in enumerate(hits))
    ideal = sum(1.0 / math.log2(r + 2) for r in range(min(len(positives), k)))
    return sum(hits) / len(positives), dcg / ideal if ideal else 0.0


def _percentiles(values: Sequence[float]) -> Dict:
    if not len(values):
        return {"count": 0}
    v = np.asarray(values, dtype=np.float64)
    return {"count": int(len(v)), "mean": float(v.mean()), "p50": float(np.percentile(v, 50)),
            "p90": float(np.percentile(v, 90)), "p99": float(np.percentile(v, 99)), "max": float(v.max())}


# fixed log-spaced latency bins (0.1 ms .. 100 s), the same for every variant and report
LATENCY_EDGES_MS = [round(float(x), 4) for x in np.logspace(-1, 5, 31)]


def _histogram(values: Sequence[float]) -> Dict:
    counts, _ = np.histogram(np.clip(values, LATENCY_EDGES_MS[0], LATENCY_EDGES_MS[-1]), bins=LATENCY_EDGES_MS)
    return {"edges_ms": LATENCY_EDGES_MS, "counts": counts.tolist()}


def variant_stats(records: Dict[str, Dict]) -> Dict:
    statuses = Counter(int(_attrs(r).get("statusCode") or 0) for r in records.values())
    n = len(records)
    server_errors = sum(c for s, c in statuses.items() if s == 0 or s >= 500)
    ok_model = [_attrs(r).get("modelLatencyMs") for r in records.values() if _attrs(r).get("statusCode") == 200]
    total = [_attrs(r).get("latencyMs") for r in records.values() if _attrs(r).get("latencyMs") is not None]
    versions = Counter(_attrs(r).get("modelVersion") for r in records.values() if _attrs(r).get("modelVersion"))
    return {"requests": n, "statuses": {str(s): c for s, c in sorted(statuses.items())},
            "server_errors": server_errors, "client_errors": sum(c for s, c in statuses.items() if 400 <= s < 500),
            "error_rate": server_errors / n if n else 0.0,
            "model_latency_ms": _percentiles([x for x in ok_model if x is not None]),
            "model_latency_histogram": _histogram([x for x in ok_model if x is not None]),
            "latency_ms": _percentiles(total), "model_versions": dict(versions)}


def _by_user(preds: List[Dict]) -> Dict:
    return {p.get("user_id"): p for p in preds if p.get("user_id") is not None}


def _output_truncated(rec: Dict) -> bool:
    return "endpointOutput" in (_attrs(rec).get("truncated") or {})


def compare(production: Dict[str, Dict], shadow: Dict[str, Dict], positives: Optional[Dict[int, set]]) -> Dict:
    rows = []  # per (event, user) with both answers
    truncated = 0  # joined requests left out: an answer captured cut to the capture's size limit
    for event_id in sorted(set(production) & set(shadow)):
        if _output_truncated(production[event_id]) or _output_truncated(shadow[event_id]):
            truncated += 1
            continue
        pp, sp = _predictions(production[event_id]), _predictions(shadow[event_id])
        if pp is None or sp is None:
            continue
        sp_user = _by_user(sp)
        for pu in pp:
            su = sp_user.get(pu.get("user_id"))
            if su is None:
                continue
            a = [it["id"] for it in pu["items"]]
            b = [it["id"] for it in su["items"]]
            k = max(len(a), len(b), 1)
            shared = set(a) & set(b)
            sa = {it["id"]: it["score"] for it in pu["items"]}
            sb = {it["id"]: it["score"] for it in su["items"]}
            common = sorted(shared)
            row = {"user_id": pu["user_id"], "k": k, "overlap": len(shared) / k,
                   "jaccard": len(shared) / len(set(a) | set(b)) if (a or b) else 1.0, "rbo": rbo(a, b),
                   "spearman": spearman([sa[i] for i in common], [sb[i] for i in common])}
            if positives is not None and pu["user_id"] in positives:
                pos = positives[pu["user_id"]]
                row["recall_p"], row["ndcg_p"] = recall_ndcg(a, pos, k)
                row["recall_s"], row["ndcg_s"] = recall_ndcg(b, pos, k)
            rows.append(row)
    return {"rows": rows, "truncated": truncated}


def _bootstrap(diff: np.ndarray, n: int, seed: int) -> Tuple[float, float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), size=(n, len(diff)))].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def verdict(cfg: ShadowReportConfig, joined: int, prod: Dict, shad: Dict,
            quality: Optional[Dict]) -> Tuple[str, List[str]]:
    why: List[str] = []
    if joined < cfg.min_requests:
        return "inconclusive", [f"{joined} joined requests < min_requests {cfg.min_requests}"]
    if shad["error_rate"] > prod["error_rate"] + cfg.max_error_rate_increase:
        why.append(f"shadow error rate {shad['error_rate']:.4f} > production {prod['error_rate']:.4f} "
                   f"+ {cfg.max_error_rate_increase}")
    p99p, p99s = prod["model_latency_ms"].get("p99"), shad["model_latency_ms"].get("p99")
    if p99p and (p99s is None or p99s > cfg.max_latency_ratio * p99p):
        why.append(f"shadow p99 model latency {p99s} ms > {cfg.max_latency_ratio} x production {p99p:.3f} ms")
    if why:
        return "keep", why
    if quality is not None and quality["labelled_users"] < cfg.min_labelled_users:
        return "inconclusive", [f"{quality['labelled_users']} labelled users "
                                f"< min_labelled_users {cfg.min_labelled_users}"]
    if quality is None:
        return "inconclusive", ["no held-out labels (--data-dir) to judge quality by; guards passed"]
    lo, hi = quality["ndcg_diff_ci95"]
    if lo > 0:
        return "promote", [f"NDCG@k difference 95% interval [{lo:.4f}, {hi:.4f}] is above 0; guards passed"]
    if hi < 0:
        return "keep", [f"NDCG@k difference 95% interval [{lo:.4f}, {hi:.4f}] is below 0"]
    if -cfg.equivalence_margin <= lo and hi <= cfg.equivalence_margin:
        return "keep", [f"NDCG@k difference 95% interval [{lo:.4f}, {hi:.4f}] within +-{cfg.equivalence_margin}: "
                        "no gain worth a change"]
    return "inconclusive", [f"NDCG@k difference 95% interval [{lo:.4f}, {hi:.4f}] straddles 0; collect more traffic"]


def build_report(cfg: ShadowReportConfig) -> Dict:
    if not cfg.capture_dir:
        raise ValueError("--capture-dir is required")
    endpoint, records = read_capture(cfg.capture_dir, cfg.endpoint_name)
    if PRODUCTION not in records:
        raise ValueError(f"{cfg.capture_dir}/{endpoint}: no production records")
    prod_recs, shad_recs = records[PRODUCTION], records.get(SHADOW, {})
    positives = test_positives(cfg.data_dir) if cfg.data_dir else None
    prod, shad = variant_stats(prod_recs), variant_stats(shad_recs)
    joined = len(set(prod_recs) & set(shad_recs))
    compared = compare(prod_recs, shad_recs, positives)
    rows = compared["rows"]
    ks = Counter(r["k"] for r in rows)
    agreement = {"pairs": len(rows), "k": ks.most_common(1)[0][0] if ks else None,
                 "truncated_requests": compared["truncated"]}
    for name in ("overlap", "jaccard", "rbo"):
        agreement[f"mean_{name}"] = float(np.mean([r[name] for r in rows])) if rows else None
    rhos = [r["spearman"] for r in rows if r["spearman"] is not None]
    agreement["mean_score_spearman"] = float(np.mean(rhos)) if rhos else None
    agreement["score_spearman_users"] = len(rhos)
    quality = None
    if positives is not None:
        lab = [r for r in rows if "ndcg_p" in r]
        diff = np.asarray([r["ndcg_s"] - r["ndcg_p"] for r in lab])
        quality = {"labelled_users": len(lab),
                   "production": {"recall@k": float(np.mean([r["recall_p"] for r in lab])) if lab else None,
                                  "ndcg@k": float(np.mean([r["ndcg_p"] for r in lab])) if lab else None},
                   "shadow": {"recall@k": float(np.mean([r["recall_s"] for r in lab])) if lab else None,
                              "ndcg@k": float(np.mean([r["ndcg_s"] for r in lab])) if lab else None},
                   "ndcg_diff": float(diff.mean()) if lab else None,
                   "ndcg_diff_ci95": _bootstrap(diff, cfg.bootstrap, cfg.seed) if lab else (0.0, 0.0)}
    decision, reasons = verdict(cfg, joined, prod, shad, quality)
    return {"endpoint": endpoint, "joined_requests": joined, "variants": {PRODUCTION: prod, SHADOW: shad},
            "agreement": agreement, "quality": quality, "verdict": decision, "reasons": reasons,
            "thresholds": {k: v for k, v in asdict(cfg).items() if k not in ("capture_dir", "data_dir", "output_dir",
                                                                             "endpoint_name")},
            "_rows": rows, "_latency": {role: [_attrs(r).get("modelLatencyMs") for r in recs.values()
                                               if _attrs(r).get("modelLatencyMs") is not None]
                                        for role, recs in ((PRODUCTION, prod_recs), (SHADOW, shad_recs))}}


def markdown(report: Dict) -> str:
    p, s = report["variants"][PRODUCTION], report["variants"][SHADOW]
    a, q = report["agreement"], report["quality"]

    def ms(v, key):
        x = v["model_latency_ms"].get(key)
        return "-" if x is None else f"{x:.2f}"

    def num(x, fmt="{:.4f}"):
        return "-" if x is None else fmt.format(x)

    lines = [f"# Shadow test report: {report['endpoint']}", "",
             f"**Verdict: {report['verdict'].upper()}**: " + "; ".join(report["reasons"]), "",
             "| | production | shadow |", "|---|---|---|",
             f"| model version | {', '.join(p['model_versions']) or '-'} | {', '.join(s['model_versions']) or '-'} |",
             f"| requests | {p['requests']} | {s['requests']} |",
             f"| server errors (5xx / no answer) | {p['server_errors']} | {s['server_errors']} |",
             f"| client errors (4xx) | {p['client_errors']} | {s['client_errors']} |",
             f"| model latency p50 / p90 / p99 ms | {ms(p, 'p50')} / {ms(p, 'p90')} / {ms(p, 'p99')} | "
             f"{ms(s, 'p50')} / {ms(s, 'p90')} / {ms(s, 'p99')} |"]
    if q:
        lines += [f"| Recall@{a['k']} | {num(q['production']['recall@k'])} | {num(q['shadow']['recall@k'])} |",
                  f"| NDCG@{a['k']} | {num(q['production']['ndcg@k'])} | {num(q['shadow']['ndcg@k'])} |"]
    lines += ["", f"Agreement over {a['pairs']} user answers of {report['joined_requests']} "
              f"joined requests (k = {a['k']}): "
              f"overlap@k {num(a['mean_overlap'], '{:.3f}')}, Jaccard {num(a['mean_jaccard'], '{:.3f}')}, "
              f"RBO {num(a['mean_rbo'], '{:.3f}')}, score Spearman on shared items "
              f"{num(a['mean_score_spearman'], '{:.3f}')} ({a['score_spearman_users']} users)."]
    if a.get("truncated_requests"):
        lines += ["", f"{a['truncated_requests']} joined requests left out: an answer was captured cut to the "
                  "capture's size limit (--capture-max-payload-bytes)."]
    if q:
        lo, hi = q["ndcg_diff_ci95"]
        lines += ["", f"NDCG@k difference (shadow - production) over {q['labelled_users']} labelled users: "
                  f"{num(q['ndcg_diff'])}, 95% bootstrap interval [{lo:.4f}, {hi:.4f}]."]
    lines += ["", "Thresholds: " + ", ".join(f"{k}={v}" for k, v in report["thresholds"].items()), "",
              "![latency](latency.png)", "", "![agreement](agreement.png)", "",
              "![NDCG@k difference interval](interval.png)", ""]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_figure(report: Dict):
    """Model latency per variant: outlined (step) histograms on shared log bins, so neither hides the other."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    lat = {k: np.asarray(v, dtype=float) for k, v in report["_latency"].items() if len(v)}
    if lat:
        hi = max(v.max() for v in lat.values())
        lo = max(min(v.min() for v in lat.values()), 1e-3)
        bins = np.logspace(np.log10(lo), np.log10(max(hi, lo * 1.01)), 50)
        for role, v in lat.items():
            ax.hist(v, bins=bins, histtype="step", lw=1.6, label=f"{role} (p99 {np.percentile(v, 99):.2f} ms)")
        ax.set_xscale("log")
        ax.legend()
    ax.set(xlabel="model latency (ms)", ylabel="requests", title="Latency per variant")
    fig.tight_layout()
    return fig


AGREEMENT_PANELS = (("overlap", "overlap@k (shared items / k)"), ("rbo", "RBO (p=0.9, rank-weighted)"))


def agreement_figure(report: Dict):
    """Top-k agreement of production and shadow per user answer: one panel per measure."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(AGREEMENT_PANELS), figsize=(10, 4), sharey=True)
    rows = report["_rows"]
    bins = np.linspace(0, 1, 21)
    for ax, (key, title) in zip(axes, AGREEMENT_PANELS):
        values = [r[key] for r in rows]
        if values:
            ax.hist(values, bins=bins, color="tab:blue")
            ax.axvline(float(np.mean(values)), color="black", ls="--", lw=1, label=f"mean {np.mean(values):.3f}")
            ax.legend()
        ax.set(title=title, xlabel="agreement of production and shadow top-k", xlim=(0, 1))
    axes[0].set_ylabel("user answers")
    fig.suptitle(f"Top-k agreement over {len(rows)} user answers")
    fig.tight_layout()
    return fig


def interval_figure(report: Dict):
    """What the verdict rests on: the shadow's NDCG@k gain over production (mean over labelled
    users) with its 95% bootstrap interval, against 0 and the equivalence margin (`verdict`)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 2.8))
    q = report["quality"]
    margin = float(report["thresholds"].get("equivalence_margin", 0.0))
    ax.axvspan(-margin, margin, color="0.88", label=f"equivalence margin +-{margin:g}")
    ax.axvline(0.0, color="black", lw=1)
    if q is not None and q["ndcg_diff"] is not None:
        lo, hi = q["ndcg_diff_ci95"]
        mean = q["ndcg_diff"]
        ax.errorbar([mean], [0], xerr=[[mean - lo], [hi - mean]], fmt="o", color="tab:red", capsize=6, lw=2,
                    label=f"mean {mean:+.4f}, 95% interval [{lo:+.4f}, {hi:+.4f}]")
        span = max(abs(lo), abs(hi), margin, 1e-3) * 1.3
        ax.set_xlim(-span, span)
        ax.legend(loc="upper left", fontsize=8)
        note = f"{q['labelled_users']} labelled users"
    else:
        ax.text(0.5, 0.5, "no held-out labels (--data-dir): no quality interval", transform=ax.transAxes,
                ha="center", va="center")
        note = "no labels"
    ax.set_yticks([])
    ax.set_ylim(-1, 1)
    ax.set(xlabel="NDCG@k, shadow - production", title=f"Verdict {report['verdict'].upper()}: NDCG@k difference "
                                                          f"({note})")
    fig.tight_layout()
    return fig


PLOTS = (("latency.png", latency_figure), ("agreement.png", agreement_figure), ("interval.png", interval_figure))


def plot(report: Dict, out_dir: str) -> List[str]:
    """Write the report's figures (`PLOTS`) as PNGs into `out_dir`; returns their paths."""
    plt = _pyplot()
    paths = []
    for name, figure in PLOTS:
        fig = figure(report)
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def write_report(cfg: ShadowReportConfig) -> Dict:
    """Compute the report and write report.json, report.md, latency.png, agreement.png and interval.png."""
    report = build_report(cfg)
    out_dir = cfg.output_dir or os.path.join(cfg.capture_dir, "report")
    os.makedirs(out_dir, exist_ok=True)
    files = plot(report, out_dir)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["files"] = [os.path.join(out_dir, "report.json"), os.path.join(out_dir, "report.md"), *files]
    with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(public, f, indent=1)
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write(markdown(report))
    return public
