"""Deploy an exported model to a SageMaker real-time endpoint and smoke-test it.

    python -m entrypoints.sagemaker_deploy --model outputs/RUN/model --endpoint-name twotower \
        [--serving-image ACCOUNT.dkr.ecr.REGION.amazonaws.com/twotower-serve:TAG] [--capture true] \
        [--role ARN] [--endpoint-url http://127.0.0.1:5000 for a moto server]

--model may also be a model.tar.gz (local or s3://) or job:<training job name>. Packages
model.tar.gz (model files + code/inference.py + code/requirements.txt), uploads it, creates the
model (AWS's PyTorch inference image by default: the export needs only torch), an endpoint config
and the endpoint (or moves an existing endpoint to the new config), waits, and invokes it once.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from twotower_lit.aws.config import AwsConfig, DeployConfig, split_namespace
from twotower_lit.options import OneLineHelpFormatter, add_arguments


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_deploy", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, DeployConfig)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--no-wait", action="store_true", help="return once the endpoint is being created")
    ns = parser.parse_args(argv)
    no_wait = ns.no_wait
    del ns.no_wait
    cfg, aws = split_namespace(ns, DeployConfig, AwsConfig)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.deploy import deploy
    from twotower_lit.aws.session import AwsContext

    print(json.dumps(deploy(AwsContext(aws), cfg, wait=not no_wait), indent=1, default=str))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
