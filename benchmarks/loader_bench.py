"""Data-loader throughput on local Parquet shards: `python -m benchmarks.loader_bench [--ratings N]`.

Prepares a synthetic ml-1m-layout set (cached under --work-dir), then times one epoch of the
training reader of one rank (rows per second through shard reading, shuffle buffer, negative
sampling and KeyedJaggedTensor assembly), with 0 and 4 negatives, in the calling thread (one
worker's work). Target: >= 3 M rows/s per worker, so the loader is never the bottleneck.

Then times `--data-on-device true`'s reader (`DeviceResidentBatches`, on the GPU when there is one)
over the same split at --device-batch-size: host milliseconds per batch (what the training loop's
host spends on it) and milliseconds per batch with the device work done.
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
    p.add_argument("--device-batch-size", type=int, default=65536)
    args = p.parse_args(argv)

    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.datamodule import MovieLensDataModule
    from twotower_lit.data.loader import RatingsShardReader
    from twotower_lit.data.negatives import NegativeSampler
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
    device_resident(dm, args.device_batch_size, args.repeats)


def device_resident(dm, batch_size: int, repeats: int) -> None:
    import torch

    from twotower_lit.data.device_batches import DeviceResidentBatches

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    reader = DeviceResidentBatches(dm.splits["train"], dm.source("train").rows, dm.builder, batch_size, device=device)
    sum(1 for _ in reader)  # warm-up: allocator, kernels
    host = total = float("inf")
    for epoch in range(repeats):
        reader.set_epoch(epoch)
        sync()
        t0 = time.perf_counter()
        count = sum(1 for _ in reader)
        host = min(host, (time.perf_counter() - t0) / count)
        sync()
        total = min(total, (time.perf_counter() - t0) / count)
    print(f"device-resident reader on {device}, batch {batch_size:,}, {count} batches: host {host * 1e3:.3f} "
          f"ms/batch, {total * 1e3:.3f} ms/batch with the device work ({batch_size / total / 1e6:.1f} M rows/s)")


if __name__ == "__main__":
    main()
