"""Offline recommendations (`python -m entrypoints.recommend`) in users per second, end to end
(scoring through the endpoint's recommender, seen items excluded, Parquet written), over random
exports of ml-1m's shape (6,040 users x 3,706 items) and ML-32M's (200,948 users x 87,585 items),
with the towers' 64-dimensional output and ``--seen`` training items per user.

    python -m benchmarks.recommend_bench [--shapes ml-1m ml-32m] [--timed-users 20000] [--k 100] \
        [--search exact] [--json benchmarks/recommend.jsonl]

On the ML-32M shape only the first ``--timed-users`` users are scored (the rate does not depend
on how many more there are: memory and work are per chunk of users). One JSON line per shape: the
shape, users timed, users/s, rows, seconds, threads, and the machine with its load average (the
figures on a shared machine move with it).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

SHAPES = {"ml-1m": (6040, 3706), "ml-32m": (200948, 87585)}


def _machine() -> dict:
    load = os.getloadavg()
    return {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
            "load_avg_1_5_15": [round(x, 2) for x in load]}


def main(argv=None) -> int:
    import torch

    from twotower_lit.batch import RecommendConfig, recommend
    from twotower_lit.serving.synthetic import random_export

    p = argparse.ArgumentParser(prog="python -m benchmarks.recommend_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--timed-users", type=int, default=20000, help="users scored on shapes with more users")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--seen", type=int, default=100, help="training items per user (excluded from the answers)")
    p.add_argument("--search", default="exact")
    p.add_argument("--batch-users", type=int, default=4096)
    p.add_argument("--json", help="append one JSON line per shape to this file")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        for shape in args.shapes:
            users, items = SHAPES[shape]
            model = os.path.join(tmp, shape)
            t0 = time.perf_counter()
            random_export(model, num_users=users, num_items=items, embedding_dim=64, user_layers=(128, 64),
                          seen_per_user=min(args.seen, items), seed=0)
            built = time.perf_counter() - t0
            timed = min(users, args.timed_users)
            selection = "all"
            if timed < users:
                selection = os.path.join(tmp, f"{shape}-users.txt")
                with open(selection, "w") as f:
                    f.write("\n".join(str(u) for u in range(1, timed + 1)) + "\n")
            summary = recommend(RecommendConfig(model_dir=model, output=os.path.join(tmp, f"{shape}.parquet"),
                                                users=selection, k=args.k, search=args.search,
                                                batch_users=args.batch_users, progress=False))
            line = {"shape": shape, "users": users, "items": items, "timed_users": timed, "k": args.k,
                    "search": args.search, "users_per_s": summary["users_per_s"], "rows": summary["rows"],
                    "seconds": summary["seconds"], "load_seconds": summary["load_seconds"],
                    "export_build_seconds": round(built, 1), "threads": torch.get_num_threads(),
                    "machine": _machine()}
            print(json.dumps(line), flush=True)
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps(line) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
