"""Train the two-tower recommender: `python -m entrypoints.train [--data-dir DIR] [options]`.

Runs the same way on a laptop, under torchrun, and as a SageMaker training job (which passes
hyperparameters as arguments and sets SM_* variables; see `twotower_lit.aws.environment`).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from typing import List, Mapping, Optional

if importlib.util.find_spec("twotower_lit") is None:  # run as a script (SageMaker: torchrun entrypoints/train.py)
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from twotower_lit.aws.environment import apply_sagemaker_environment, publish_model, training_arguments  # noqa: E402
from twotower_lit.config import TrainConfig  # noqa: E402
from twotower_lit.options import OneLineHelpFormatter, add_arguments, from_namespace  # noqa: E402


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(prog="python -m entrypoints.train", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, TrainConfig)
    return from_namespace(TrainConfig, parser.parse_args(training_arguments(argv)))


# set by a launcher that started this process as one rank of several (torchrun, SLURM's srun,
# MPI, LSF): such a process must not start ranks of its own
LAUNCHER_VARIABLES = ("LOCAL_RANK", "RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                      "PMI_SIZE", "LSB_JOBID")


def torchrun_command(cfg: TrainConfig, argv: List[str], environ: Mapping[str, str],
                     gpus: int) -> Optional[List[str]]:
    """The command that restarts this job under torchrun with one process per device, or None to
    run it here (one device, several nodes, started by a launcher, or ``--launcher lightning``).

    Why: with ``--devices N`` alone, Lightning starts the other N - 1 processes inside
    ``Trainer.fit``, and each of them then goes through the job's whole start-up (imports, data
    and model set-up) while the first waits. torchrun starts all of them at once. `gpus` is the
    number of visible GPUs: ``--launcher auto`` uses torchrun for GPU jobs that have them."""
    run = cfg.distributed
    if run.devices <= 1 or run.launcher == "lightning" or any(v in environ for v in LAUNCHER_VARIABLES):
        return None
    if run.num_nodes > 1:
        if run.launcher == "torchrun":
            raise ValueError(f"--launcher torchrun starts the processes of one node; for --num-nodes {run.num_nodes} "
                             f"start torchrun on every node (see the README) or use --launcher lightning")
        return None
    if run.launcher == "auto" and (run.accelerator == "cpu" or gpus < run.devices):
        return None  # (too few GPUs: Lightning's own error names them)
    script = os.path.abspath(__file__)
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.devices}",
            script, *argv]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    cfg = apply_sagemaker_environment(parse_args(argv))
    import torch

    gpus = torch.cuda.device_count() if cfg.distributed.launcher == "auto" else 0
    command = torchrun_command(cfg, argv, os.environ, gpus)
    if command is not None:
        print(f"starting {cfg.distributed.devices} processes under torchrun: {' '.join(command)}", flush=True)
        os.execv(command[0], command)  # replaced: signals reach torchrun, which passes them to the ranks

    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.data.download import DownloadError
    from twotower_lit.data.validation import DataValidationError
    from twotower_lit.training import run

    try:
        if run(cfg) is not None:
            publish_model(cfg)
    except (DataValidationError, DownloadError, CheckpointError) as e:
        # bad input data or a damaged checkpoint: one actionable line, not a traceback
        print(f"train: error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
