"""Run `entrypoints/train.py` as a SageMaker training job (torchrun on every instance).

    python -m entrypoints.sagemaker_train --data-dir PREPARED --max-epochs 5 \
        --instance-type ml.g5.2xlarge --instance-count 2 [--spot true] [--checkpoint-s3-uri auto] \
        [--role ARN] [--endpoint-url http://127.0.0.1:5000 for a moto server] [--dry-run]

Takes every training option of `python -m entrypoints.train` (the same TrainConfig; options that
describe the container, like --output-dir and --devices, are decided inside the job), plus the job's
options. A local --data-dir is uploaded to S3 first. SDK: v2 (PyTorch estimator) or v3 (ModelTrainer),
whichever is installed: run it with the interpreter of .venv-sagemaker-v2 or -v3 (scripts/setup.sh).
--debug shows the traceback of a failure.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile

from twotower_lit.aws.config import AwsConfig, SageMakerTrainConfig, split_namespace
from twotower_lit.config import TrainConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_train", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, TrainConfig)
    add_arguments(parser, SageMakerTrainConfig)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--dry-run", action="store_true", help="print the job that would be started, start nothing")
    ns = parser.parse_args(argv)
    dry_run = ns.dry_run
    del ns.dry_run
    return (*split_namespace(ns, TrainConfig, SageMakerTrainConfig, AwsConfig), dry_run)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.mlflow import require_plugin
    from twotower_lit.aws.session import AwsContext
    from twotower_lit.aws.training import describe_training_job, plan_training_job, resolve_sdk, start_training_job

    cfg, job, aws, dry_run = parse_args(argv)
    require_plugin(cfg.tracking.mlflow_uri)
    # a dry run needs no SDK; a launch finds out it has none before anything is uploaded
    sdk = None if dry_run else resolve_sdk(job.sdk)
    ctx = AwsContext(aws)
    with tempfile.TemporaryDirectory() as workdir:
        plan = plan_training_job(ctx, cfg, job, workdir, upload=not dry_run, sdk=sdk)
        print(json.dumps(plan.summary(), indent=1, default=str))
        if dry_run:
            return 0
        name = start_training_job(ctx, plan, job.sdk, wait=job.wait, logs=job.logs)
    print(json.dumps(describe_training_job(ctx, name), indent=1, default=str))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
