"""Prepare throughput and peak memory: `python -m benchmarks.prepare_bench` prints a table.

Cases: 1M synthetic ratings in the ml-1m layout, the real ml-100k / ml-latest-small when
../shared/data/movielens holds them, and 32M synthetic ratings in the ml-32m CSV layout.
Each generate / prepare runs in a fresh child process so its peak RSS is its own
(``resource.getrusage``). Targets: <= 5 s for 1M; <= 90 s and <= 8 GB peak for 32M.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parent.parent
REAL = REPO.parent / "shared" / "data" / "movielens"
TARGETS = {1_000_000: (5.0, None), 32_000_000: (90.0, 8.0)}  # rows -> (seconds, GB)


def _child(argv: List[str]) -> None:
    """Run one step in this process and print its figures as JSON on the last line."""
    sys.path.insert(0, str(REPO))
    ap = argparse.ArgumentParser()
    ap.add_argument("step", choices=("generate", "prepare"))
    ap.add_argument("--data-dir")
    ap.add_argument("--output-dir")
    ap.add_argument("--n", type=int)
    ap.add_argument("--layout")
    args = ap.parse_args(argv)
    logs: List[str] = []
    start = time.perf_counter()
    if args.step == "generate":
        from twotower_lit.data.synthetic import generate_movielens
        generate_movielens(args.data_dir, args.n, args.layout, seed=0, log=logs.append)
        rows = args.n
    else:
        from twotower_lit.config import PrepareConfig
        from twotower_lit.data.prepare import prepare_dataset
        m = prepare_dataset(PrepareConfig(data_dir=args.data_dir), args.output_dir, log=logs.append)
        rows = m["counts"]["raw_rows"]
    seconds = time.perf_counter() - start
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    print(json.dumps({"seconds": seconds, "peak_gb": peak_gb, "rows": rows, "log": logs}))


def _run(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.prepare_bench", "--child", *args], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _read_seconds(log: List[str]) -> Optional[float]:
    for line in log:
        if line.startswith("prepare: read ") and " in " in line:
            return float(line.rsplit(" in ", 1)[1].split()[0])
    return None


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        _child(argv[1:])
        return 0
    ap = argparse.ArgumentParser(prog="python -m benchmarks.prepare_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work-dir", default="/tmp/twotower_prepare_bench", help="scratch space (~4 GB for 32M)")
    ap.add_argument("--skip-32m", action="store_true", help="only the small cases")
    ap.add_argument("--keep", action="store_true", help="keep the generated and prepared files")
    args = ap.parse_args(argv)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)

    cases = [("synthetic ml-1m layout", 1_000_000, "ml-1m", None)]
    for name in ("ml-100k", "ml-latest-small"):
        if (REAL / name).is_dir():
            cases.append((f"real {name}", None, None, REAL / name))
    if not args.skip_32m:
        cases.append(("synthetic ml-32m CSV layout", 32_000_000, "ml-32m", None))

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python "
          f"{platform.python_version()}")
    header = f"{'case':<30} {'rows':>12} {'generate s':>11} {'prepare s':>10} {'(parse s)':>10} " \
             f"{'peak GB':>8} {'Mrows/s':>8}  target"
    print(header)
    print("-" * len(header))
    failed = False
    for label, n, layout, real in cases:
        gen = None
        if real is None:
            raw = work / f"raw-{layout}-{n}" / layout
            shutil.rmtree(raw.parent, ignore_errors=True)
            gen = _run("generate", "--data-dir", str(raw), "--n", str(n), "--layout", layout)
        else:
            raw = real
        out = work / f"out-{label.replace(' ', '_')}"
        shutil.rmtree(out, ignore_errors=True)
        prep = _run("prepare", "--data-dir", str(raw), "--output-dir", str(out))
        target = TARGETS.get(prep["rows"])
        verdict = ""
        if target:
            ok = prep["seconds"] <= target[0] and (target[1] is None or prep["peak_gb"] <= target[1])
            failed |= not ok
            verdict = f"<= {target[0]:g} s" + (f", <= {target[1]:g} GB" if target[1] else "") + \
                      (" OK" if ok else " MISSED")
        parse = _read_seconds(prep["log"])
        print(f"{label:<30} {prep['rows']:>12,} {gen['seconds'] if gen else float('nan'):>11.1f} "
              f"{prep['seconds']:>10.1f} {parse if parse is not None else float('nan'):>10.1f} "
              f"{prep['peak_gb']:>8.2f} {prep['rows'] / prep['seconds'] / 1e6:>8.2f}  {verdict}")
        if gen:
            print(f"{'  (generate peak GB)':<30} {'':>12} {'':>11} {'':>10} {'':>10} {gen['peak_gb']:>8.2f}")
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
            if real is None:
                shutil.rmtree(raw.parent, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
