"""A local hyperparameter search with Optuna (`python -m entrypoints.tune`).

One Optuna study in a SQLite database in the output directory (an interrupted search resumes
where it stopped: the finished trials are kept, an interrupted one is run again), a TPE sampler
and median pruning on the per-epoch validation metric. Each trial is one in-process
`twotower_lit.training.run` with the trial's values over the command line's training options, its
MLflow run nested under the search's run. ``OUT/tuning.json`` holds every trial and the best one.
"""
from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import sys
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Mapping, Optional

import lightning as L

from twotower_lit.config import TrainConfig
from twotower_lit.options import opt as _opt, from_dict, to_flat_dict
from twotower_lit.evaluation import metric_key
from twotower_lit.tuning.space import Param, command_line, load_space, option_types, suggest

RESULTS = "tuning.json"
STUDY_DB = "study.db"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
# metrics where lower is better; every other one (AUC, accuracy, recall, NDCG) is maximised
_LOWER_IS_BETTER = ("logloss", "loss")


@dataclass
class TuneConfig:
    """The search around the training options (`entrypoints.tune`)."""

    trials: int = _opt(20, "trials the study should hold when done (finished and pruned ones; a resumed "
                           "search runs only the rest)")
    metric: str = _opt("val_recall@10", "per-epoch validation metric to optimise and prune on (val_recall@K, "
                                         "val_ndcg@K, val_auc, val_accuracy, val_logloss)")
    direction: str = _opt("auto", "maximize or minimize the metric (auto: minimize for a loss, else maximize)",
                          ("auto", "maximize", "minimize"))
    jobs: int = _opt(1, "trials run at once, each in a process of its own (they share the study)")
    space: Optional[str] = _opt(None, "search-space file (default: twotower_lit/tuning/search_space.yaml)")
    study_name: str = _opt("twotower", "name of the Optuna study in OUTPUT/study.db")
    pruning_warmup_epochs: int = _opt(1, "epochs every trial trains before it can be pruned")
    startup_trials: int = _opt(5, "trials sampled at random before TPE takes over (and before pruning starts)")
    defaults_first: bool = _opt(True, "a new study's first trial is the training defaults (or the values given "
                                      "here), the baseline the search is measured against")
    keep_checkpoints: bool = _opt(False, "keep each trial's checkpoints (its export in OUTPUT/trials/N/model stays)")


def direction_of(metric: str, direction: str = "auto") -> str:
    if direction != "auto":
        return direction
    return "minimize" if any(metric.endswith(s) for s in _LOWER_IS_BETTER) else "maximize"


class ValidationPruning(L.Callback):
    """Reports the validation metric to the Optuna trial after every validation, and stops the
    run (Lightning's ``should_stop``: the run still tests and exports what it has) when the pruner
    says so. Reads the value from ``trainer.callback_metrics``, where the module and the
    `RetrievalEvaluation` callback put it."""

    def __init__(self, trial, metric: str) -> None:
        self.trial = trial
        self.metric = metric
        self.key = metric_key(metric)
        self.values: List[float] = []
        self.pruned_at: Optional[int] = None

    def on_validation_end(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.key)
        if value is None:
            logged = sorted(k for k in trainer.callback_metrics if k.startswith("val_"))
            raise KeyError(f"--metric {self.metric}: the run logs no {self.key}; validation metrics logged: "
                           f"{', '.join(logged)} (write @ for _at_)")
        value = float(value)
        self.values.append(value)
        self.trial.report(value, step=trainer.current_epoch)
        if self.trial.should_prune():
            self.pruned_at = trainer.current_epoch
            trainer.should_stop = True


def exported_value(metrics: Mapping[str, Any], key: str, values: List[float]) -> float:
    """A trial's value: `key` (``val_recall_at_10``) of the epoch its run tested and exported
    (``train.best_epoch`` of its metrics: the best one, not necessarily the last), else the last
    validation's."""
    train = metrics.get("train", {})
    row = next((h for h in train.get("val_history", []) if h["epoch"] == train.get("best_epoch")), None)
    return float(row[key]) if row is not None and key in row else values[-1]


def _storage_url(output_dir: str) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(output_dir, STUDY_DB))


def prepare_data(options: Mapping[str, Any], output_dir: str) -> str:
    """The prepared dataset every trial reads: ``data_dir`` of the flat training `options` if it is
    prepared, else prepared once into OUTPUT/data (with the prepare options among `options`)."""
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import is_prepared, prepare_dataset

    data_dir = options.get("data_dir")
    if data_dir and is_prepared(data_dir):
        return data_dir
    names = set(option_types(PrepareConfig))
    prep = from_dict(PrepareConfig, {k: v for k, v in options.items() if k in names})
    if not (data_dir or prep.download or prep.synthetic):
        raise ValueError("give --data-dir (a raw MovieLens directory or a prepared one), --download or --synthetic")
    target = os.path.join(output_dir, "data")
    prepare_dataset(replace(prep, data_dir=data_dir, output_dir=target, seed=options["seed"]), target)
    return target


def _trial_options(given: Mapping[str, Any], data_dir: str, output_dir: str, number: int,
                   values: Mapping[str, Any], tracking_uri: Optional[str]) -> Dict[str, Any]:
    options = dict(given)
    options.update(values)
    options.update(data_dir=data_dir, output_dir=os.path.join(output_dir, "trials", f"{number:04d}"),
                   registered_model_name="", resume=None, mlflow_uri=tracking_uri or "none")
    options.setdefault("progress", False)
    return options


def _finish_process_group() -> None:
    """A trial that failed leaves its process group behind (Lightning's error path does not destroy
    it): destroy it, so that the next trial can start one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _objective(tune: TuneConfig, given: Mapping[str, Any], params: List[Param], data_dir: str, output_dir: str,
               tracking_uri: Optional[str], parent_run: Optional[str]):
    import optuna

    from twotower_lit import training

    def objective(trial) -> float:
        values = suggest(trial, params)
        options = _trial_options(given, data_dir, output_dir, trial.number, values, tracking_uri)
        cfg = from_dict(TrainConfig, options)
        trial_dir = options["output_dir"]
        pruning = ValidationPruning(trial, tune.metric)
        tags = {"tune.study": tune.study_name, "tune.trial": str(trial.number)}
        if parent_run:
            tags["mlflow.parentRunId"] = parent_run
        print(f"trial {trial.number}: {json.dumps(values, default=str)}", flush=True)
        started = time.perf_counter()
        run_dir = os.environ.pop("TWOTOWER_RUN_DIR", None)  # each trial's run directory is its own
        try:
            metrics = training.run(cfg, callbacks=[pruning], run_tags=tags)
        except (ValueError, RuntimeError, KeyError) as e:
            _finish_process_group()
            trial.set_user_attr("error", f"{type(e).__name__}: {e}"[:1000])
            print(f"trial {trial.number} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            raise
        finally:
            if run_dir is not None:
                os.environ["TWOTOWER_RUN_DIR"] = run_dir
            if not tune.keep_checkpoints:
                shutil.rmtree(os.path.join(trial_dir, "checkpoints"), ignore_errors=True)
        if not pruning.values:
            raise RuntimeError(f"trial {trial.number}: no validation ran, so there is no {tune.metric} to optimise")
        trial.set_user_attr("test", metrics["test"])
        trial.set_user_attr("epochs", len(pruning.values))
        trial.set_user_attr("seconds", round(time.perf_counter() - started, 1))
        trial.set_user_attr("output_dir", trial_dir)
        run_id = (metrics.get("mlflow") or {}).get("run_id")
        if run_id:
            trial.set_user_attr("mlflow_run_id", run_id)
        state = "PRUNED" if pruning.pruned_at is not None else "COMPLETE"
        if run_id and tracking_uri:
            from mlflow.tracking import MlflowClient

            MlflowClient(tracking_uri).set_tag(run_id, "tune.state", state)
        value = exported_value(metrics, pruning.key, pruning.values)
        print(f"trial {trial.number}: {tune.metric} {value:.4f} (the exported epoch's) after {len(pruning.values)} "
              f"epoch(s){' (pruned)' if state == 'PRUNED' else ''}", flush=True)
        if state == "PRUNED":
            raise optuna.TrialPruned(f"pruned after epoch {pruning.pruned_at}")
        return value

    return objective


def _study(tune: TuneConfig, output_dir: str, seed: int, load_only: bool = False):
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=tune.startup_trials)
    pruner = optuna.pruners.MedianPruner(n_startup_trials=tune.startup_trials,
                                         n_warmup_steps=tune.pruning_warmup_epochs)
    if load_only:
        return optuna.load_study(study_name=tune.study_name, storage=_storage_url(output_dir), sampler=sampler,
                                 pruner=pruner)
    return optuna.create_study(study_name=tune.study_name, storage=_storage_url(output_dir), sampler=sampler,
                               pruner=pruner, direction=direction_of(tune.metric, tune.direction),
                               load_if_exists=True)


def _finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def _optimize(tune: TuneConfig, given: Dict[str, Any], params: List[Param], data_dir: str, output_dir: str,
              tracking_uri: Optional[str], parent_run: Optional[str], seed: int) -> None:
    import optuna
    from optuna.study import MaxTrialsCallback
    from optuna.trial import TrialState

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(tune, output_dir, seed, load_only=True)
    objective = _objective(tune, given, params, data_dir, output_dir, tracking_uri, parent_run)
    # every worker stops once the study holds `trials` finished trials, however they were shared out
    stop = MaxTrialsCallback(tune.trials, states=(TrialState.COMPLETE, TrialState.PRUNED))
    while _finished(study) < tune.trials:
        before = len(study.get_trials(deepcopy=False))
        study.optimize(objective, n_trials=tune.trials - _finished(study), callbacks=[stop],
                       catch=(ValueError, RuntimeError, KeyError), gc_after_trial=True)
        failed = [t for t in study.get_trials(deepcopy=False)[before:] if t.state == TrialState.FAIL]
        if failed and len(failed) == len(study.get_trials(deepcopy=False)[before:]):
            raise RuntimeError(f"every trial of this round failed; the first: "
                               f"{failed[0].user_attrs.get('error', 'see the log above')}")


def _worker(*args) -> None:  # a spawned process of --jobs
    _optimize(*args)


def _requeue_interrupted(study) -> int:
    """Trials left RUNNING by an interrupted search: marked failed and their values queued again."""
    from optuna.trial import TrialState

    stale = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(t.params, user_attrs={"retry_of": t.number}, skip_if_exists=False)
    return len(stale)


def _enqueue_defaults(study, params: List[Param], options: Mapping[str, Any]) -> None:
    """Queue the training defaults as the study's first trial (when the space contains them)."""
    values = {p.name: options[p.name] for p in params}
    outside = [f"{name}={value}" for p in params for name, value in [(p.name, values[p.name])]
               if not p.contains(value)]
    if outside:
        print(f"the training defaults are outside the search space ({', '.join(outside)}): no baseline trial",
              flush=True)
        return
    study.enqueue_trial(values, user_attrs={"baseline": True})


def _parent_run(study, tracking_uri: Optional[str], output_dir: str, tune: TuneConfig, given: Mapping[str, Any],
                experiment: str) -> Optional[str]:
    if not tracking_uri:
        return None
    from mlflow.tracking import MlflowClient

    from twotower_lit import tracking

    client = MlflowClient(tracking_uri)
    run_id = study.user_attrs.get(PARENT_RUN_ATTR)
    if run_id:
        client.update_run(run_id, status="RUNNING")
        return run_id
    experiment_id = tracking.prepare_experiment(tracking_uri, output_dir, experiment)
    run = client.create_run(experiment_id, run_name=f"tune-{tune.study_name}",
                            tags={"tune.study": tune.study_name, "tune.metric": tune.metric})
    for name, value in {**{f"tune.{k}": v for k, v in vars(tune).items()},
                        **{f"fixed.{k}": v for k, v in given.items()}}.items():
        client.log_param(run.info.run_id, name, str(value)[:6000])
    study.set_user_attr(PARENT_RUN_ATTR, run.info.run_id)
    return run.info.run_id


def summarize(study, tune: TuneConfig, given: Mapping[str, Any], space_path: str) -> Dict[str, Any]:
    """What tuning.json holds: every trial (params, value, state, test metrics) and the best one."""
    from optuna.trial import TrialState

    trials = []
    for t in study.get_trials(deepcopy=False):
        entry = {"number": t.number, "state": t.state.name, "params": t.params, "value": t.value,
                 "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}}
        for key in ("baseline", "test", "epochs", "seconds", "output_dir", "mlflow_run_id", "error", "retry_of"):
            if key in t.user_attrs:
                entry[key] = t.user_attrs[key]
        trials.append(entry)
    out: Dict[str, Any] = {"study": tune.study_name, "metric": tune.metric,
                           "direction": study.direction.name.lower(), "space": space_path,
                           "fixed": dict(given), "trials": trials, "best": None,
                           "baseline": next((t for t in trials if t.get("baseline")), None)}
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        out["best"] = {"number": best.number, "params": best.params, "value": best.value,
                       "test": best.user_attrs.get("test"), "output_dir": best.user_attrs.get("output_dir"),
                       "command": command_line(best.params, given)}
    return out


def tune(train_options: Mapping[str, Any], tune_cfg: TuneConfig) -> Dict[str, Any]:
    """Run (or resume) the search; returns what it writes to OUTPUT/tuning.json.

    `train_options` are the training options given on the command line (flat names), fixed for
    every trial; the search space's values go over them."""
    import optuna

    from twotower_lit import tracking

    params = load_space(tune_cfg.space)
    given = dict(train_options)
    clash = sorted(set(given) & {p.name for p in params} - {"data_dir", "output_dir"})
    if clash:
        raise ValueError(f"{', '.join('--' + c.replace('_', '-') for c in clash)}: searched by the search space, "
                         f"so it cannot also be fixed on the command line")
    base = to_flat_dict(from_dict(TrainConfig, given))  # (flat names: the sections may move)
    if base["devices"] * base["num_nodes"] != 1:
        raise ValueError("entrypoints.tune runs each trial in one process: leave --devices and --num-nodes at 1 "
                         "(use --jobs for trials side by side)")
    if tune_cfg.trials < 1 or tune_cfg.jobs < 1:
        raise ValueError("--trials and --jobs must be at least 1")
    if not tune_cfg.metric.startswith("val_"):
        raise ValueError(f"--metric {tune_cfg.metric}: tune on a validation metric (val_...); the test split "
                         f"stays for the final comparison")
    output_dir = os.path.abspath(base["output_dir"] or os.path.join("outputs", f"tune-{tune_cfg.study_name}"))
    os.makedirs(output_dir, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(tune_cfg, output_dir, base["seed"])
    if study.direction.name.lower() != direction_of(tune_cfg.metric, tune_cfg.direction):
        raise ValueError(f"{os.path.join(output_dir, STUDY_DB)}: study {tune_cfg.study_name!r} was created to "
                         f"{study.direction.name.lower()}; give another --study-name or --output-dir")
    data_dir = prepare_data(base, output_dir)
    for name in ("data_dir", "output_dir"):
        given.pop(name, None)
    fixed = {"data_dir": base["data_dir"] or data_dir, **given}  # what the best command line repeats
    requeued = _requeue_interrupted(study)
    if tune_cfg.defaults_first and not study.get_trials(deepcopy=False):
        _enqueue_defaults(study, params, base)
    done = _finished(study)
    if done or requeued:
        print(f"resuming study {tune_cfg.study_name!r} in {_storage_url(output_dir)}: {done} trial(s) finished"
              f"{f', {requeued} interrupted one(s) to run again' if requeued else ''}", flush=True)
    tracking_uri = tracking.tracking_uri(base["mlflow_uri"], output_dir)
    parent = _parent_run(study, tracking_uri, output_dir, tune_cfg, given, base["experiment_name"])
    args = (tune_cfg, given, params, data_dir, output_dir, tracking_uri, parent)
    status = "FAILED"
    try:
        if tune_cfg.jobs == 1:
            _optimize(*args, base["seed"])
        else:
            spawn = multiprocessing.get_context("spawn")
            workers = [spawn.Process(target=_worker, args=(*args, base["seed"] + 1 + j)) for j in range(tune_cfg.jobs)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            bad = [w.exitcode for w in workers if w.exitcode]
            if bad:
                raise RuntimeError(f"{len(bad)} of {tune_cfg.jobs} trial workers failed (exit codes {bad}); "
                                   f"see their output above")
        status = "FINISHED"
    finally:
        study = _study(tune_cfg, output_dir, base["seed"], load_only=True)
        result = summarize(study, tune_cfg, fixed, tune_cfg.space or "twotower_lit/tuning/search_space.yaml")
        result.update(storage=_storage_url(output_dir), output_dir=output_dir, mlflow_parent_run_id=parent,
                      tracking_uri=tracking_uri)
        with open(os.path.join(output_dir, RESULTS), "w") as f:
            json.dump(result, f, indent=1, default=str)
        if parent:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri)
            if result["best"]:
                client.log_metric(parent, "best_" + metric_key(tune_cfg.metric), result["best"]["value"])
                client.set_tag(parent, "tune.best_trial", str(result["best"]["number"]))
            client.log_artifact(parent, os.path.join(output_dir, RESULTS))
            client.set_terminated(parent, status=status)
    return result


def flat_train_options(cfg_values: Mapping[str, Any]) -> Dict[str, Any]:
    """Check `cfg_values` (flat training options, dashes or underscores) and return them with underscores."""
    options = {k.replace("-", "_"): v for k, v in cfg_values.items()}
    from_dict(TrainConfig, options)  # raises, naming any unknown option
    known = to_flat_dict(TrainConfig())
    return {k: v for k, v in options.items() if k in known}
