"""Search the training hyperparameters locally with Optuna.

    python -m entrypoints.tune --data-dir ../shared/data/movielens/ml-100k --trials 16 --output-dir outputs/tune \
        [--metric val_recall@10] [--max-epochs 8] [--jobs 1] [any training option, fixed for every trial]

The search space is twotower_lit/tuning/search_space.yaml (--space for another file); every other
training option keeps its default or the value given here. TPE sampler, median pruning on the
per-epoch validation metric, the study in OUTPUT/study.db: running the same command again resumes
an interrupted search (or extends a finished one to a larger --trials). Each trial is an MLflow run
nested under the search's run (OUTPUT/mlflow.db unless --mlflow-uri). Writes OUTPUT/tuning.json
(every trial's params, value and state; the best one) and prints the best trial's command line.
"""
from __future__ import annotations

import argparse
import json
import sys

from twotower_lit.config import TrainConfig
from twotower_lit.options import OneLineHelpFormatter, add_arguments, iter_fields


def parse_args(argv=None):
    from twotower_lit.tuning.local import TuneConfig

    parser = argparse.ArgumentParser(prog="python -m entrypoints.tune", description=__doc__,
                                     formatter_class=OneLineHelpFormatter)
    add_arguments(parser, TuneConfig)
    add_arguments(parser, TrainConfig)
    values = vars(parser.parse_args(argv))  # only the options given (defaults are suppressed)
    tune_names = {path[-1] for path, _, _ in iter_fields(TuneConfig)}
    from twotower_lit.options import from_dict

    tune_cfg = from_dict(TuneConfig, {k: v for k, v in values.items() if k in tune_names})
    return {k: v for k, v in values.items() if k not in tune_names}, tune_cfg


def main(argv=None) -> int:
    train_options, tune_cfg = parse_args(argv)
    from twotower_lit.tuning.local import tune

    try:
        result = tune(train_options, tune_cfg)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"tune: error: {e}", file=sys.stderr, flush=True)
        return 2
    states = {}
    for t in result["trials"]:
        states[t["state"]] = states.get(t["state"], 0) + 1
    print(f"\n{len(result['trials'])} trials ({', '.join(f'{n} {s.lower()}' for s, n in sorted(states.items()))}); "
          f"results: {result['output_dir']}/tuning.json")
    best = result["best"]
    if best is None:
        print("no trial completed", file=sys.stderr)
        return 1
    print(f"best: trial {best['number']}, {result['metric']} {best['value']:.4f}; test "
          f"{json.dumps({k: round(v, 4) for k, v in (best['test'] or {}).items()})}")
    print(f"best command line:\n  {best['command']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
