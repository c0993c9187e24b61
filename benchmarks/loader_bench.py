"""Data-loader throughput on local Parquet shards: `python -m benchmarks.loader_bench [--ratings N]`.

Prepares a synthetic ml-1m-layout set (cached under --work-dir), then times one epoch of the
training reader of one rank (rows per second through shard reading, shuffle buffer, negative
sampling and KeyedJaggedTensor assembly), with 0 and 4 negatives, in the calling thread (one
worker's work). Target: >= 3 M rows/s per worker, so the loader is never the bottleneck.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

TARGET_ROWS_PER_S = 3e6


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ratings", type=int, default=1_000_000)
    p.add_argument("--batch-size", type=int, default=8192)
    p.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "twotower-loader-bench"))
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.data.loader import NegativeSampler, RatingsShardReader
    from twotower_lit.data.prepare import prepare_dataset

    data = os.path.join(args.work_dir, f"synthetic-{args.ratings}")
    prepare_dataset(PrepareConfig(synthetic=args.ratings, synthetic_layout="ml-1m"), data, log=lambda *a, **k: None)
    dm = MovieLensDataModule(data, batch_size=args.batch_size)
    dm.load()
    sampler = NegativeSampler(dm.seen.keys(dm.num_items), dm.num_items)
    print(f"{args.ratings:,} synthetic ratings, {dm.source('train').total_rows:,} training rows in "
          f"{len(dm.source('train').paths)} shards, batch {args.batch_size:,}, one worker")
    print(f"{'negatives':>10} {'rated rows/s':>14} {'all rows/s':>14} {'target':>8}")
    for negatives in (0, 4):
        best = 0.0
        for _ in range(args.repeats):
            reader = RatingsShardReader(dm.source("train"), dm.builder, args.batch_size, negatives=negatives,
                                        sampler=sampler, prefetch_batches=0)
            t0 = time.perf_counter()
            rows = sum(len(b) for b in reader)
            best = max(best, rows / (1 + negatives) / (time.perf_counter() - t0))
        ok = "met" if best * (1 + negatives) >= TARGET_ROWS_PER_S else "MISSED"  # rows the trainer consumes
        print(f"{negatives:>10} {best / 1e6:>12.2f} M {best * (1 + negatives) / 1e6:>12.2f} M {ok:>8}")


if __name__ == "__main__":
    main()
