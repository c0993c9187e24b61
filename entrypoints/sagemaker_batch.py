"""Recommendations for many users as a SageMaker Batch Transform job (the real-time endpoint's
model package and handler, on machines that exist only for the job).

    python -m entrypoints.sagemaker_batch --model outputs/RUN/model --input all --k 100 \
        [--output s3://BUCKET/batch/out] [--fetch-to outputs/batch] [--role ARN] \
        [--endpoint-url http://127.0.0.1:5000 for a moto server]

--input is JSON lines, one request per line as the endpoint takes it ({"user_id": 42, "k": 100};
{"user_id": 99999, "user_features": {...}} for a cold start): an s3:// URI, a local file
(uploaded) or 'all' (every user of a local --model directory). The job splits it by line into
multi-record invocations (up to --max-payload-mb each) and joins the answers into <input>.out
under --output; with --fetch-to they are downloaded and written as recommendations.parquet
(user_id, rank, item_id, score, title, source), the layout of python -m entrypoints.recommend.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from twotower_lit.aws.config import AwsConfig, split_namespace
from twotower_lit.options import OneLineHelpFormatter, add_arguments


def main(argv=None) -> int:
    from twotower_lit.aws.batch import BatchTransformConfig

    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_batch", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, BatchTransformConfig)
    add_arguments(parser, AwsConfig)
    cfg, aws = split_namespace(parser.parse_args(argv), BatchTransformConfig, AwsConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.batch import run_transform
    from twotower_lit.aws.session import AwsContext

    print(json.dumps(run_transform(AwsContext(aws), cfg), indent=1, default=str))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
