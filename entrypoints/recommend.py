"""Top-k recommendations for every user of an exported model, written as Parquet.

    python -m entrypoints.recommend --model-dir outputs/RUN/model --output recs.parquet \
        [--users all|FILE] [--k 100] [--exclude-seen true] [--search exact|faiss] [--batch-users 4096] \
        [--device cpu|cuda]

Scored from the export alone (torch and safetensors; no TorchRec) by the endpoint's own
recommender: the same answers as the endpoint, known users from their training features, unknown
users of a users file with user_features by the cold-start path, the items a user rated in
training left out. Columns: user_id, rank, item_id, score, title, source. --output may be
s3://bucket/key.parquet (AWS credentials and AWS_ENDPOINT_URL from the environment).
"""
from __future__ import annotations

import argparse
import json
import sys

from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace


def main(argv=None) -> int:
    from twotower_lit.batch import RecommendConfig, recommend
    from twotower_lit.export.format import ArtifactError

    parser = argparse.ArgumentParser(prog="python -m entrypoints.recommend", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, RecommendConfig)
    cfg = from_namespace(RecommendConfig, parser.parse_args(argv))
    try:
        summary = recommend(cfg)
    except (ValueError, RuntimeError, OSError, ArtifactError) as e:
        print(f"recommend: error: {e}", file=sys.stderr, flush=True)
        return 2
    print(json.dumps(summary, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
