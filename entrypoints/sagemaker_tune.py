"""Search the training hyperparameters with SageMaker Automatic Model Tuning.

    python -m entrypoints.sagemaker_tune --data-dir PREPARED --max-epochs 8 --instance-type ml.g5.2xlarge \
        [--max-jobs 16] [--max-parallel-jobs 2] [--strategy Bayesian] [--objective-metric val:recall@10] \
        [--early-stopping Auto] [--role ARN] [--endpoint-url http://127.0.0.1:5000 for a moto server] [--dry-run]

The SDK's HyperparameterTuner over the training job of python -m entrypoints.sagemaker_train (the
same options, the same estimator), with the search space of python -m entrypoints.tune
(twotower_lit/tuning/search_space.yaml; --space for another) and the objective parsed from each
job's log by the training job's metric definitions. Those are the test split's figures of the
summary the job prints at its end: the local search (entrypoints.tune) optimises the validation
metric instead. Needs SDK v2 (.venv-sagemaker-v2/bin/python); --dry-run needs none.
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
    from twotower_lit.aws.tuning import SageMakerTuneConfig

    parser = argparse.ArgumentParser(prog="python -m entrypoints.sagemaker_tune", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, SageMakerTuneConfig)
    add_arguments(parser, TrainConfig)
    add_arguments(parser, SageMakerTrainConfig)
    add_arguments(parser, AwsConfig)
    parser.add_argument("--dry-run", action="store_true", help="print the tuning job that would be started, "
                                                               "start nothing")
    ns = parser.parse_args(argv)
    dry_run = ns.dry_run
    del ns.dry_run
    return (*split_namespace(ns, SageMakerTuneConfig, TrainConfig, SageMakerTrainConfig, AwsConfig), dry_run)


def main(argv=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from twotower_lit.aws.session import AwsContext
    from twotower_lit.aws.training import plan_training_job, resolve_sdk
    from twotower_lit.aws.tuning import (check_objective, describe_tuning_job, start_tuning_job, tuning_job_config,
                                         tuning_job_name)
    from twotower_lit.tuning.space import load_space

    tune, cfg, job, aws, dry_run = parse_args(argv)
    params = load_space(tune.space)
    sdk = None if dry_run else resolve_sdk(job.sdk)
    ctx = AwsContext(aws)
    with tempfile.TemporaryDirectory() as workdir:
        plan = plan_training_job(ctx, cfg, job, workdir, upload=not dry_run, sdk=sdk or "v2")
        check_objective(tune, plan.metric_definitions)
        summary = {"tuning_job": tuning_job_name(ctx, tune), "config": tuning_job_config(tune, params),
                   "training_job": plan.summary()}
        print(json.dumps(summary, indent=1, default=str))
        if dry_run:
            return 0
        name = start_tuning_job(ctx, plan, tune, job.sdk, wait=job.wait)
    print(json.dumps(describe_tuning_job(ctx, name), indent=1, default=str))
    return 0


if __name__ == "__main__":
    from twotower_lit.aws.cli import run

    sys.exit(run(main))
