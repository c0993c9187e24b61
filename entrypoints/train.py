"""Train the two-tower recommender: `python -m entrypoints.train [--data-dir DIR] [options]`.

Runs the same way on a laptop, under torchrun, and as a SageMaker training job (which passes
hyperparameters as arguments and sets SM_* variables; see `twotower_lit.sagemaker_env`).
"""
from __future__ import annotations

import argparse
import sys
import warnings

from twotower_lit.config import TrainConfig, add_arguments, from_namespace


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.train", description=__doc__,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser, TrainConfig)
    return from_namespace(TrainConfig, parser.parse_args(argv))


def main(argv=None) -> int:
    warnings.filterwarnings("ignore", module="torchrec")
    from twotower_lit.training import run

    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
