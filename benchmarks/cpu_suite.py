"""The CPU benchmark suite in one command: `python -m benchmarks.cpu_suite [--out DIR] [--quick]`.

Runs, each in its own process so one's memory and threads do not disturb the next:
  1. data preparation (1M and, without --quick, 32M synthetic ratings; real sets if present),
  2. the shard loader alone,
  3. training throughput with data in memory (ml-1m- and ML-32M-shaped tables, batch 8k and 64k):
     the Lightning/TorchRec path with and without TorchRec's pipeline, eager DMP, TorchRec's
     pipeline alone and plain PyTorch, on 1 and 2 gloo processes; and the in-batch softmax of
     the default objective, the job's implementation against the same terms written plainly,
  4. training end to end from Parquet shards (`entrypoints.train`, 1 and 2 processes, batch 8k and 64k),
  5. serving latency and throughput,
  6. what logging a metric to MLflow costs the training loop (synchronous and asynchronous).
Writes every table to DIR/cpu_suite.md (and the raw JSON lines of step 3 to DIR/train_throughput.jsonl).
The GPU part is `bash benchmarks/gpu_suite.sh`; recommendation quality is `python -m benchmarks.quality`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parent.parent


def run(cmd: List[str], timeout: int = 3600) -> str:
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    out = proc.stdout.strip()
    if proc.returncode != 0:
        out += f"\n\nFAILED (exit {proc.returncode}):\n" + proc.stderr[-3000:]
    return out + f"\n\n({time.perf_counter() - t0:.0f} s)"


def table_lines(text: str) -> str:
    """Keep a benchmark's own report, dropping library log noise."""
    noise = ("WARNING", "W11", "INFO", "[rank", "warn", "Warning", "sharding plan:")
    return "\n".join(line for line in text.splitlines() if not line.startswith(noise))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/benchmarks")
    p.add_argument("--quick", action="store_true", help="skip the 32M-rating preparation and shorten runs")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    torchrun = str(Path(py).parent / "torchrun")
    throughput = out / "train_throughput.jsonl"
    throughput.unlink(missing_ok=True)
    sections = []

    sections.append(("Data preparation",
                     run([py, "-m", "benchmarks.prepare_bench"] + (["--skip-32m"] if args.quick else []))))
    sections.append(("Shard loader (one worker)", run([py, "-m", "benchmarks.loader_bench"])))
    steps = "10" if args.quick else "30"
    text = []
    for procs in ("1", "2"):
        for shape in ("ml-1m", "ml-32m"):
            for batch in ("8192", "65536"):
                text.append(run([torchrun, "--standalone", "--nproc_per_node", procs, "-m",
                                 "benchmarks.train_throughput", "--shape", shape, "--batch", batch, "--steps", steps,
                                 "--warmup", "3", "--json", str(throughput)]))
    sections.append(("Training throughput, data in memory (CPU, gloo)", "\n".join(table_lines(t) for t in text)))
    sections.append(("In-batch sampled softmax of `--loss softmax|both`, forward and backward",
                     run([py, "-m", "benchmarks.loss_bench", "--device", "cpu"] +
                         (["--rows", "16384", "--repeats", "3"] if args.quick else []))))

    data = out / "synthetic-1m"
    run([py, "-m", "entrypoints.prepare", "--synthetic", "1000000", "--output-dir", str(data)])
    rows = ["| processes | batch | steps | training-loop seconds | samples/s in the training loop | "
            "samples/s over the whole fit | test AUC |", "|---|---|---|---|---|---|---|"]
    for procs in ("1", "2"):
        for batch in ("8192", "65536"):
            target = out / f"e2e-{procs}-{batch}"
            # BCE without negatives: the same objective as the in-memory benchmark above
            log = run([py, "-m", "entrypoints.train", "--data-dir", str(data), "--output-dir", str(target),
                       "--devices", procs, "--accelerator", "cpu", "--max-epochs", "1", "--batch-size", batch,
                       "--loss", "bce", "--negatives", "0", "--num-workers", "1", "--progress", "false",
                       "--mlflow-uri", "none"])
            try:
                m = json.loads((target / "metrics.json").read_text())
                t = m["train"]
                rows.append(f"| {procs} | {batch} | {t['steps']} | {t['loop_seconds']} | {t['samples_per_s']:,} | "
                            f"{t['fit_samples_per_s']:,} | {m['test']['auc']:.4f} |")
            except (OSError, KeyError, ValueError):
                rows.append(f"| {procs} | {batch} | failed: {log[-500:]!r} |")
    sections.append(("Training end to end from Parquet shards (1M synthetic ratings, `entrypoints.train`)",
                     "\n".join(rows)))
    sections.append(("Serving", run([py, "-m", "benchmarks.serving_bench"] +
                                    (["--duration", "2"] if args.quick else []))))
    sections.append(("Experiment tracking (MLflow logging of the training loss)",
                     table_lines(run([py, "-m", "benchmarks.tracking_bench"]))))

    load = os.getloadavg()
    header = (f"# CPU benchmark suite\n\nMachine: {platform.processor() or platform.machine()}, "
              f"{os.cpu_count()} cores, Python {platform.python_version()}; "
              f"load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} "
              f"(other work on the machine inflates every figure).\n")
    body = "\n\n".join(f"## {title}\n\n```\n{text}\n```" if not text.startswith("|") else f"## {title}\n\n{text}"
                       for title, text in sections)
    report = out / "cpu_suite.md"
    report.write_text(header + "\n" + body + "\n")
    print(report.read_text())
    print(f"written: {report}")


if __name__ == "__main__":
    main()
