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
from twotower_lit.aws.mlflow import MLFLOW_SERVER_VERSION
from twotower_lit.options import OneLineHelpFormatter, add_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_mlflow", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--name", default="twotower", help="tracking server name (default: %(default)s)")
    parser.add_argument("--size", default="Small", choices=("Small", "Medium", "Large"))
    parser.add_argument("--artifact-store", default=None, help="S3 URI for artifacts (default s3://BUCKET/PREFIX/mlflow)")
    parser.add_argument("--mlflow-version", default=MLFLOW_SERVER_VERSION,
                        help="MLflow version of a server created here (3.x: the client is MLflow 3; default "
                             "%(default)s)")
    ns = parser.parse_args(argv)
    name, size, store, version = ns.name, ns.size, ns.artifact_store, ns.mlflow_version
    for extra in ("name", "size", "artifact_store", "mlflow_version"):
        delattr(ns, extra)
    (aws,) = split_namespace(ns, AwsConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.mlflow import find_or_create_tracking_server
    from twotower_lit.aws.session import AwsContext

    print(find_or_create_tracking_server(AwsContext(aws), name, store, size, mlflow_version=version))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
