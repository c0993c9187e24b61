"""What logging the training loss costs the training loop: milliseconds per MLflow `log_metrics`
call of Lightning's `MLFlowLogger`, synchronous (each call writes the store before returning) and
asynchronous (queued for MLflow's background thread; the training job's setting), one table.

    python -m benchmarks.tracking_bench                      # a fresh SQLite store (the default job's)
    python -m benchmarks.tracking_bench --tracking-uri http://127.0.0.1:5000   # an MLflow server

The training job logs every 10 steps; a GPU step takes a few milliseconds.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings


def per_call_ms(uri: str, synchronous: bool, calls: int) -> float:
    from lightning.pytorch.loggers import MLFlowLogger

    logger = MLFlowLogger(experiment_name="tracking-bench", tracking_uri=uri, synchronous=synchronous)
    logger.log_metrics({"train_loss": 1.0}, step=0)  # creates the run
    t0 = time.perf_counter()
    for step in range(1, calls + 1):
        logger.log_metrics({"train_loss": 1.0 / step, "epoch": 0.0}, step=step)
    seconds = time.perf_counter() - t0
    logger.finalize("success")  # waits for the queued metrics
    history = logger.experiment.get_metric_history(logger.run_id, "train_loss")
    if len(history) != calls + 1:
        raise RuntimeError(f"MLflow holds {len(history)} train_loss values, {calls + 1} were logged")
    return seconds / calls * 1e3


def main(argv=None) -> None:
    warnings.filterwarnings("ignore")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tracking-uri", default=None, help="default: a SQLite file in a temporary directory")
    p.add_argument("--calls", type=int, default=100)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        uri = args.tracking_uri or f"sqlite:///{os.path.join(tmp, 'mlflow.db')}"
        store = "SQLite" if uri.startswith("sqlite") else uri
        print(f"| MLflow store | logging | ms per log_metrics call ({args.calls} calls) |\n|---|---|---|")
        for synchronous in (True, False):
            ms = per_call_ms(uri, synchronous, args.calls)
            print(f"| {store} | {'synchronous' if synchronous else 'asynchronous'} | {ms:.2f} |", flush=True)


if __name__ == "__main__":
    main()
