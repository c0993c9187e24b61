"""Find or create a SageMaker managed MLflow tracking server and print its ARN (the tracking URI).

    python -m entrypoints.sagemaker_mlflow --name twotower [--size Small] [--artifact-store s3://...]

Use the ARN as --mlflow-uri of `entrypoints.train` / `entrypoints.sagemaker_train` (needs the
sagemaker-mlflow plugin: requirements/aws.txt).
"""
from __future__ import annotations

import argparse
import logging
import sys

from twotower_lit.aws.config import AwsConfig, split_namespace
from twotower_lit.config import add_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_mlflow", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--name", default="twotower", help="tracking server name (default: %(default)s)")
    parser.add_argument("--size", default="Small", choices=("Small", "Medium", "Large"))
    parser.add_argument("--artifact-store", default=None, help="S3 URI for artifacts (default s3://BUCKET/PREFIX/mlflow)")
    ns = parser.parse_args(argv)
    name, size, store = ns.name, ns.size, ns.artifact_store
    for extra in ("name", "size", "artifact_store"):
        delattr(ns, extra)
    (aws,) = split_namespace(ns, AwsConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.mlflow import find_or_create_tracking_server
    from twotower_lit.aws.session import AwsContext

    print(find_or_create_tracking_server(AwsContext(aws), name, store, size))
    return 0


if __name__ == "__main__":
    sys.exit(main())
