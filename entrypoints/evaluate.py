"""Evaluate an exported model on a prepared split and print the metrics as JSON.

`python -m entrypoints.evaluate --model-dir OUTPUT/model --data-dir PREPARED --split test`
"""
from __future__ import annotations

import argparse
import json
import sys

from twotower_lit.options import OneLineHelpFormatter


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.evaluate", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    parser.add_argument("--model-dir", required=True, help="exported model directory (OUTPUT/model)")
    parser.add_argument("--data-dir", required=True, help="prepared dataset (OUTPUT/data or a prepare output)")
    parser.add_argument("--split", default="test", choices=("train", "val", "test"))
    parser.add_argument("--k", type=int, default=10, help="cut-off of Recall@k / NDCG@k")
    args = parser.parse_args(argv)
    from twotower_lit.export.evaluate import evaluate_model_dir

    try:
        metrics = evaluate_model_dir(args.model_dir, args.data_dir, args.split, args.k)
    except (ValueError, OSError) as e:  # ArtifactError is a ValueError: a bad artifact is one line, not a traceback
        print(f"evaluate: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps({args.split: metrics}, indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
