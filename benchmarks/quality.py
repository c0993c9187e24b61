"""Recommendation quality in one table: `python -m benchmarks.quality [--data RAW_DIR ...] [--seeds 0,1,2] [--out DIR]`.

For every MovieLens directory (default: ml-100k and ml-latest-small under ../shared/data/movielens)
and both protocols
  - workshop: label rating >= 4, 3-star rows kept (label 0), random per-user 80/10/10 split;
  - neutral-dropped: as published ML-1M results (RecBole etc.): 3-star rows dropped, random 8:1:1,
it reports test AUC, log-loss (over the rated test rows), Recall@10 and NDCG@10 (full ranking of
every item the user did not rate in training) of:
  - item popularity, logistic regression on user + item ids, plain matrix factorisation
    (`twotower_lit.baselines`, trained in this process);
  - the two-tower trained by `python -m entrypoints.train` (one child process per run, the real job
    with its defaults), varying only what the row names: ids only / side features, the objective
    (`--loss`), sampled negatives.
With `--seeds 0,1,2,3` every seed prepares its own split (WORK_DIR/data/<set>-<protocol>-s<seed>) and
trains every model with that seed; the table then gives mean ± sample standard deviation over the
seeds (a second table has one row per seed) and the targets are judged on the mean. One seed is not
enough to rank configurations: on ml-100k the default two-tower's test AUC spans 0.778-0.785 over seeds 0-3.
Writes DIR/quality.md and DIR/quality.json (`results`: one row per dataset, protocol, model and seed;
`summary`: one per dataset, protocol and model) and prints the Markdown. Every figure comes from
`twotower_lit.metrics`, the same code the training job and `entrypoints.evaluate` use.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "movielens"
DEFAULT_SETS = ("ml-100k", "ml-latest-small")

PROTOCOLS = {
    "workshop": {"neutral": "keep"},
    "neutral-dropped": {"neutral": "drop"},
}

BASELINES = {"popularity": "item popularity", "logreg": "logistic regression, user + item ids",
             "mf": "matrix factorisation, ids"}
# key -> (row name, flags added to entrypoints.train's defaults)
TWO_TOWER = {
    "tt-ids": ("two-tower, ids, BCE on rated rows", ["--side-features", "false", "--loss", "bce", "--negatives", "0"]),
    "tt-side": ("two-tower + side features, BCE on rated rows", ["--loss", "bce", "--negatives", "0"]),
    "tt-negatives": ("two-tower + side, BCE + 4 uniform negatives", ["--loss", "bce", "--negatives", "4"]),
    "tt-softmax": ("two-tower + side, in-batch softmax (log-Q)", ["--loss", "softmax", "--negatives", "0"]),
    "tt-default": ("two-tower, entrypoints.train defaults", []),
}
MODELS = tuple(BASELINES) + tuple(TWO_TOWER)
METRICS = ("auc", "logloss", "recall@10", "ndcg@10", "mrr@10", "hit_rate@10", "coverage@10", "popularity_rank@10")
HEADERS = {"auc": "AUC", "logloss": "log-loss", "recall@10": "Recall@10", "ndcg@10": "NDCG@10", "mrr@10": "MRR@10",
           "hit_rate@10": "HitRate@10", "coverage@10": "coverage@10", "popularity_rank@10": "pop. rank@10"}

# Reference points quoted in the benchmarks issue (one seed, workshop protocol unless noted).
REFERENCES = [
    "ml-100k (workshop): popularity AUC 0.706 / Recall@10 0.133; id logistic regression AUC 0.773; two-tower "
    "ids 0.779, + side features 0.784; + 4 uniform negatives Recall@10 0.206 / NDCG@10 0.183 (AUC 0.736).",
    "ml-latest-small (workshop): popularity Recall@10 0.106; the 4-negatives model only ties it.",
    "ML-1M, 3-star rows dropped (published): two-tower (RecBole DSSM) AUC 0.839, DeepFM 0.900.",
]


def prepare(raw: Path, protocol: str, work: Path, seed: int) -> Path:
    """Prepared copy of `raw` under the protocol (a no-op when it is already there)."""
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    out = work / "data" / f"{raw.name}-{protocol}-s{seed}"
    cfg = PrepareConfig(data_dir=str(raw), split="random", seed=seed, **PROTOCOLS[protocol])
    prepare_dataset(cfg, str(out), log=lambda *a, **k: None)
    return out


def baseline_rows(data: Path, models: Sequence[str], seed: int, k: int) -> List[Dict]:
    """Popularity, logistic regression and MF on one prepared set (in this process)."""
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.training.report import popularity_metrics

    dm = MovieLensDataModule(str(data), seed=seed)
    dm.load()
    rows = []
    for key in models:
        if key not in BASELINES:
            continue
        t0 = time.perf_counter()
        if key == "popularity":
            m, how = popularity_metrics(dm, "test", k), "ranked by training rating count; p = smoothed positive rate"
        else:
            m, how = tuned_baseline(key, dm, seed, k)
        rows.append({"model": BASELINES[key], "key": key, "flags": how, "seconds": time.perf_counter() - t0,
                     **{name: m[name] for name in METRICS}})
    return rows


def tuned_baseline(key: str, dm, seed: int, k: int):
    """The baseline with the L2 strength of the best validation log-loss: (its test figures, how)."""
    from twotower_lit.baselines import FitConfig, train_and_evaluate

    fits = [(train_and_evaluate(key, dm, k=k, cfg=FitConfig(l2=l2, seed=seed)), l2)
            for l2 in (0.0, 1e-3, 1e-2, 3e-2, 1e-1)]
    m, l2 = min(fits, key=lambda fit: fit[0]["fit_val_logloss"])
    dim = ", dim 32" if key == "mf" else ""
    return m, f"BCE on rated rows, Adam{dim}, L2 {l2:g} (of 5, best val log-loss), {m['fit_best_epoch']} epochs"


def train_two_tower(data: Path, key: str, out: Path, seed: int, threads: int, extra: Sequence[str]) -> Dict:
    """One `entrypoints.train` run in a child process; its test figures from OUTPUT/metrics.json."""
    name, flags = TWO_TOWER[key]
    args = [sys.executable, "-m", "entrypoints.train", "--data-dir", str(data), "--output-dir", str(out),
            "--progress", "false", "--registered-model-name", "", "--seed", str(seed), *flags, *extra]
    # one BLAS/OpenMP thread per run: these small steps are overhead-bound, and two threads on a
    # busy 2-core box made an epoch ~4x slower (threads spinning against each other)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[2:])} exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    with open(out / "metrics.json") as f:
        metrics = json.load(f)
    test = metrics["test"]
    return {"model": name, "key": key, "flags": " ".join(flags + list(extra)) or "(defaults)",
            "seconds": time.perf_counter() - t0, "train_seconds": metrics["train"]["seconds"],
            "epochs": metrics["train"]["epochs"], "best_epoch": metrics["train"].get("best_epoch"),
            **{m: test[m] for m in METRICS}}


def train_defaults() -> Dict[str, object]:
    """The entrypoints.train defaults that shape the model and its objective (for the report)."""
    from twotower_lit.config import TrainConfig
    from twotower_lit.options import to_flat_dict

    flat = to_flat_dict(TrainConfig())
    keys = ("max_epochs", "batch_size", "embedding_dim", "user_layers", "item_layers", "exposure_dims", "loss",
            "softmax_weight", "softmax_temperature", "softmax_rows", "vector_l2", "negatives", "embedding_optimizer",
            "embedding_lr", "dense_optimizer", "dense_lr")
    return {key: flat[key] for key in keys}


def summarize(results: List[Dict]) -> List[Dict]:
    """One row per (dataset, protocol, model): mean and sample standard deviation over the seeds, n."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in results:
        groups.setdefault((r["dataset"], r["protocol"], r["key"]), []).append(r)
    summary = []
    for (dataset, protocol, key), rows in groups.items():
        flags = {r["flags"] for r in rows}
        row = {"dataset": dataset, "protocol": protocol, "model": rows[0]["model"], "key": key, "n": len(rows),
               "seeds": [r["seed"] for r in rows],
               "flags": flags.pop() if len(flags) == 1 else "differs by seed (per-seed table)",
               "seconds": statistics.fmean(r["seconds"] for r in rows)}
        for m in METRICS:
            values = [r[m] for r in rows]
            row[m] = statistics.fmean(values)
            row[f"{m}_sd"] = statistics.stdev(values) if len(values) > 1 else None
        summary.append(row)
    return summary


def figure(row: Dict, metric: str) -> str:
    """`0.7812`, or `0.7812 ± 0.0031` for a summary row over several seeds (a popularity rank, a
    number of items, with one decimal)."""
    sd = row.get(f"{metric}_sd")
    places = 1 if metric.startswith("popularity_rank") else 4
    return f"{row[metric]:.{places}f}" if sd is None else f"{row[metric]:.{places}f} ± {sd:.{places}f}"


def check_targets(results: List[Dict], summary: List[Dict]) -> List[str]:
    """The issue's targets against the default configuration, where the data to judge them is here.

    With several seeds a target is judged on the mean over the seeds (`summary`, from `summarize`),
    and the line says on how many single seeds it was met."""

    def get(dataset: str, protocol: str, key: str) -> Optional[Dict]:
        return next((r for r in summary if (r["dataset"], r["protocol"], r["key"]) == (dataset, protocol, key)), None)

    def judged(row: Dict, metric: str, target: float) -> str:
        if row["n"] == 1:
            return f"{'met' if row[metric] >= target else 'MISSED'}"
        met = sum(r[metric] >= target for r in results
                  if (r["dataset"], r["protocol"], r["key"]) == (row["dataset"], row["protocol"], row["key"]))
        return f"mean {'met' if row[metric] >= target else 'MISSED'}, met on {met} of {row['n']} seeds"

    def over(row: Dict) -> str:
        return "" if row["n"] == 1 else f" (mean ± sd) over {row['n']} seeds"

    lines = []
    d, side, neg = get("ml-100k", "workshop", "tt-default"), get("ml-100k", "workshop", "tt-side"), \
        get("ml-100k", "workshop", "tt-negatives")
    if d:
        lines.append(f"ml-100k workshop, default two-tower AUC {figure(d, 'auc')}{over(d)} (target >= 0.785: "
                     f"{judged(d, 'auc', 0.785)}"
                     + (f"; side-feature BCE two-tower here {figure(side, 'auc')}" if side else "") + ")")
        lines.append(f"ml-100k workshop, default two-tower Recall@10 {figure(d, 'recall@10')}{over(d)} (target >= "
                     f"0.22: {judged(d, 'recall@10', 0.22)}"
                     + (f"; 4-negatives model here {figure(neg, 'recall@10')}" if neg else "") + ")")
    d, pop = get("ml-latest-small", "workshop", "tt-default"), get("ml-latest-small", "workshop", "popularity")
    if d and pop:
        lines.append(f"ml-latest-small workshop, default two-tower Recall@10 {figure(d, 'recall@10')} vs popularity "
                     f"{figure(pop, 'recall@10')}{over(d)} "
                     f"({d['recall@10'] / max(pop['recall@10'], 1e-9):.2f}x{' of the means' if d['n'] > 1 else ''})")
    for r in summary:
        if r["protocol"] == "neutral-dropped" and r["key"] == "tt-default":
            note = "" if r["dataset"] == "ml-1m" else " (DeepFM's 0.900 is on ML-1M; not comparable across sets)"
            lines.append(f"{r['dataset']} neutral-dropped, default two-tower AUC {figure(r, 'auc')}{over(r)}{note}")
    return lines


def markdown(report: Dict) -> str:
    seeds = report["seeds"]
    if len(seeds) == 1:
        runs = f"Seed {seeds[0]}, one run per row."
    else:
        runs = (f"Seeds {', '.join(map(str, seeds))}, each with its own split, initialisation and data order; the "
                f"first table gives mean ± sample standard deviation over the {len(seeds)} seeds, the second "
                "one run per row.")
    out = ["# Recommendation quality", "",
           f"Machine: {report['machine']['description']}. {runs} "
           f"Benchmark wall time {report['seconds'] / 60:.1f} min.", "",
           "Protocols: **workshop** = label rating >= 4, 3-star rows kept, random per-user 80/10/10; "
           "**neutral-dropped** = 3-star rows dropped, random per-user 8:1:1 (published ML-1M protocol). "
           "AUC / log-loss over rated test rows; Recall@10 / NDCG@10 / MRR@10 / HitRate@10 by full ranking of the "
           "items each user did not rate in training, over users with a liked test item; coverage@10: share of the "
           "catalogue in some user's top 10; pop. rank@10: mean popularity rank of the recommended items (1 = the "
           "most rated training item).", "",
           "Two-tower rows are `python -m entrypoints.train` runs with its defaults plus the flags shown; "
           "defaults: " + ", ".join(f"{k}={v}" for k, v in report["train_defaults"].items()) + ".", ""]
    if len(seeds) == 1:
        out += per_seed_table(report["results"], with_seed=False)
    else:
        out += ["| dataset | protocol | model | seeds | " + " | ".join(map(HEADERS.get, METRICS))
                + " | seconds | how |",
                "|---|---|---|---|" + "---|" * len(METRICS) + "---|---|"]
        for r in report["summary"]:
            out.append(f"| {r['dataset']} | {r['protocol']} | {r['model']} | {r['n']} | "
                       + " | ".join(figure(r, m) for m in METRICS) + f" | {r['seconds']:.0f} | {r['flags']} |")
        order = {(r["dataset"], r["protocol"], r["key"]): i for i, r in enumerate(report["summary"])}
        rows = sorted(report["results"], key=lambda r: (order[(r["dataset"], r["protocol"], r["key"])],
                                                        seeds.index(r["seed"])))
        out += ["", "## Per seed", ""] + per_seed_table(rows, with_seed=True)
    out += ["", "## Targets (benchmarks issue)", ""] + [f"- {line}" for line in report["targets"]]
    out += ["", "## Reference points quoted in the issue", ""] + [f"- {line}" for line in REFERENCES]
    return "\n".join(out) + "\n"


def per_seed_table(rows: List[Dict], with_seed: bool) -> List[str]:
    """Markdown table lines, one run per row (with a `seed` column when asked)."""
    seed = " seed |" if with_seed else ""
    out = [f"| dataset | protocol | model |{seed} " + " | ".join(HEADERS[m] for m in METRICS) + " | seconds | how |",
           "|---|---|---|" + ("---|" if with_seed else "") + "---|" * len(METRICS) + "---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['protocol']} | {r['model']} |" + (f" {r['seed']} |" if with_seed else "")
                   + " " + " | ".join(figure({m: r[m]}, m) for m in METRICS)
                   + f" | {r['seconds']:.0f} | {r['flags']} |")
    return out


def machine() -> Dict[str, object]:
    import torch

    cpu = platform.processor() or platform.machine()
    return {"description": f"{cpu}, {os.cpu_count()} cores, CPU only, python {platform.python_version()}, "
                           f"torch {torch.__version__}",
            "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__}


def parse_seeds(ap: argparse.ArgumentParser, text: str) -> List[int]:
    """`0,1,2` -> [0, 1, 2]; a malformed, empty or repeating list is an argparse error."""
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        ap.error(f"--seeds wants a comma list of integers, got {text!r}")
    if not seeds:
        ap.error("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        ap.error(f"--seeds repeats a seed: {text}")
    return seeds


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", default=None,
                    help="raw MovieLens directory (repeatable; default: ml-100k and ml-latest-small from "
                         f"{REAL} where present)")
    ap.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma list of {', '.join(PROTOCOLS)}")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma list of {', '.join(MODELS)}")
    ap.add_argument("--out", default="outputs/quality", help="where quality.md and quality.json go")
    ap.add_argument("--work-dir", default="/tmp/twotower_quality", help="prepared data and training runs")
    seeding = ap.add_mutually_exclusive_group()
    seeding.add_argument("--seed", type=int, default=None,
                         help="seed of the split, initialisation and data order (default 0); one-seed --seeds")
    seeding.add_argument("--seeds", default=None,
                         help="comma list of seeds, e.g. 0,1,2,3: each prepares its own split and trains every "
                              "model; the table reports mean ± sample standard deviation over them")
    ap.add_argument("--jobs", type=int, default=1, help="training runs in parallel")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per training run")
    ap.add_argument("--train-args", default="", help="extra entrypoints.train flags for every two-tower run, "
                                                      "e.g. '--max-epochs 2' for a quick look")
    args = ap.parse_args(argv)

    sets = [Path(p).resolve() for p in args.data] if args.data else [REAL / n for n in DEFAULT_SETS
                                                                     if (REAL / n).is_dir()]
    if not sets:
        ap.error(f"no data: pass --data RAW_MOVIELENS_DIR (none found under {REAL})")
    protocols = [p for p in args.protocols.split(",") if p]
    models = [m for m in args.models.split(",") if m]
    for bad, known, what in ((set(protocols) - set(PROTOCOLS), PROTOCOLS, "protocol"),
                             (set(models) - set(MODELS), MODELS, "model")):
        if bad:
            ap.error(f"unknown {what}(s) {', '.join(sorted(bad))}; choose from {', '.join(known)}")
    seeds = parse_seeds(ap, args.seeds) if args.seeds is not None else [0 if args.seed is None else args.seed]
    extra = args.train_args.split()
    work = Path(args.work_dir)
    t0 = time.perf_counter()
    cells: Dict[tuple, List[Dict]] = {}  # (seed, set, protocol) -> its rows, in --models order
    pending = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for seed in seeds:
            for raw in sets:
                for protocol in protocols:
                    data = prepare(raw, protocol, work, seed)
                    tag = {"dataset": json.loads((data / "manifest.json").read_text())["dataset"],
                           "protocol": protocol, "seed": seed}
                    rows = cells[(seed, raw, protocol)] = [None] * len(models)
                    for i, key in enumerate(models):
                        if key in TWO_TOWER:
                            out = work / "runs" / f"{raw.name}-{protocol}-s{seed}" / key
                            pending.append((rows, i, tag, pool.submit(train_two_tower, data, key, out, seed,
                                                                      args.threads, extra)))
                    for r in baseline_rows(data, models, seed, 10):  # meanwhile, in this process
                        rows[models.index(r["key"])] = {**tag, **r}
        for rows, i, tag, job in pending:
            r = rows[i] = {**tag, **job.result()}
            print(f"{r['dataset']} {r['protocol']} {r['model']} seed {r['seed']}: AUC {r['auc']:.4f} "
                  f"Recall@10 {r['recall@10']:.4f} ({r['seconds']:.0f} s)", flush=True)
    results = [r for rows in cells.values() for r in rows]
    report = {"machine": machine(), **({"seed": seeds[0]} if len(seeds) == 1 else {}), "seeds": seeds,
              "seconds": time.perf_counter() - t0, "train_defaults": train_defaults(), "extra_train_args": extra,
              "results": results, "summary": summarize(results)}
    report["targets"] = check_targets(results, report["summary"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(report, indent=1))
    text = markdown(report)
    (out / "quality.md").write_text(text)
    print(text)
    print(f"written: {out / 'quality.md'}, {out / 'quality.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
