"""Train the two-tower recommender: `python -m entrypoints.train [--data-dir DIR] [options]`.

Runs the same way on a laptop, under torchrun, and as a SageMaker training job (which passes
hyperparameters as arguments and sets SM_* variables; see `twotower_lit.aws.environment`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings

if importlib.util.find_spec("twotower_lit") is None:  # run as a script (SageMaker: torchrun entrypoints/train.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twotower_lit.aws.environment import apply_sagemaker_environment, publish_model, training_arguments  # noqa: E402
from twotower_lit.config import TrainConfig, add_arguments, from_namespace  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.train", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, TrainConfig)
    return from_namespace(TrainConfig, parser.parse_args(training_arguments(argv)))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="torchrec")
    from twotower_lit.training import run

    cfg = apply_sagemaker_environment(parse_args(argv))
    if run(cfg) is not None:
        publish_model(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
