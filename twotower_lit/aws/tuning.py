"""SageMaker Automatic Model Tuning over the training job (`entrypoints.sagemaker_tune`).

The SDK's ``HyperparameterTuner`` over the very estimator `twotower_lit.aws.training` launches
(`v2_estimator`), with the search space of the local search (`twotower_lit.tuning.space`) as its
parameter ranges and the objective read from the job's log by the training job's own metric
definitions (`twotower_lit.aws.hyperparameters.metric_definitions`): by default the validation
Recall@k the job prints after each epoch, whose last value is the exported epoch's (so the test
split stays out of the search, and AMT's early stopping sees the metric during training). A
Bayesian strategy by default.

`tuning_job_config` is the ``HyperParameterTuningJobConfig`` the SDK sends, built here as a pure
function so that it is checked against botocore's model without an SDK (and compared with what
the SDK sent in the SDK environments' tests).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from twotower_lit.aws.session import AwsContext, resource_name
from twotower_lit.options import opt as _opt
from twotower_lit.tuning.space import Param, parameter_ranges

log = logging.getLogger(__name__)

STRATEGIES = ("Bayesian", "Random", "Hyperband", "Grid")
# metrics where lower is better (the rest are maximised)
_MINIMIZE = ("logloss",)


@dataclass
class SageMakerTuneConfig:
    """Automatic Model Tuning around a SageMaker training job (`entrypoints.sagemaker_tune`)."""

    objective_metric: str = _opt("val:recall@10", "metric to optimise: one of the training job's metric definitions "
                                                  "(val:recall@K, val:auc: per epoch, the exported epoch's last; "
                                                  "test:auc, test:recall@K, ...: the final summary), parsed from "
                                                  "its log")
    objective_type: str = _opt("auto", "Maximize or Minimize (auto: Minimize for logloss, else Maximize)",
                               ("auto", "Maximize", "Minimize"))
    strategy: str = _opt("Bayesian", "how AMT picks the next values", STRATEGIES)
    max_jobs: int = _opt(16, "training jobs in all")
    max_parallel_jobs: int = _opt(2, "training jobs at once")
    early_stopping: str = _opt("Auto", "Auto: AMT stops jobs whose objective falls behind (it needs the metric "
                                       "reported during the job); Off", ("Auto", "Off"))
    space: Optional[str] = _opt(None, "search-space file (default: twotower_lit/tuning/search_space.yaml)")
    tuning_job_name: Optional[str] = _opt(None, "tuning job name (default <project>-tune-<UTC timestamp>; at most "
                                                "32 characters)")


def objective_type(cfg: SageMakerTuneConfig) -> str:
    if cfg.objective_type != "auto":
        return cfg.objective_type
    return "Minimize" if any(cfg.objective_metric.endswith(m) for m in _MINIMIZE) else "Maximize"


def check_objective(cfg: SageMakerTuneConfig, metric_definitions: List[Dict[str, str]]) -> None:
    names = [m["Name"] for m in metric_definitions]
    if cfg.objective_metric not in names:
        raise ValueError(f"--objective-metric {cfg.objective_metric}: the training job reports {', '.join(names)} "
                         f"(its metric definitions)")
    if cfg.max_jobs < 1 or not 1 <= cfg.max_parallel_jobs <= cfg.max_jobs:
        raise ValueError(f"--max-jobs {cfg.max_jobs} / --max-parallel-jobs {cfg.max_parallel_jobs}: need "
                         f"1 <= parallel jobs <= jobs")
    if cfg.strategy == "Grid" and any(p.kind != "categorical" for p in _space(cfg)):
        raise ValueError("--strategy Grid takes categorical parameters only; the search space has ranges")


def _space(cfg: SageMakerTuneConfig) -> List[Param]:
    from twotower_lit.tuning.space import load_space

    return load_space(cfg.space)


def tuning_job_config(cfg: SageMakerTuneConfig, params: List[Param]) -> Dict[str, Any]:
    """``HyperParameterTuningJobConfig`` of CreateHyperParameterTuningJob."""
    config: Dict[str, Any] = {
        "Strategy": cfg.strategy,
        "HyperParameterTuningJobObjective": {"Type": objective_type(cfg), "MetricName": cfg.objective_metric},
        "ResourceLimits": {"MaxNumberOfTrainingJobs": cfg.max_jobs,
                           "MaxParallelTrainingJobs": cfg.max_parallel_jobs},
        "ParameterRanges": parameter_ranges(params),
        "TrainingJobEarlyStoppingType": cfg.early_stopping,
    }
    return config


def tuning_job_name(ctx: AwsContext, cfg: SageMakerTuneConfig) -> str:
    return cfg.tuning_job_name or resource_name(ctx.cfg.project[:10], "tune", "@time", max_len=32)


def start_tuning_job(ctx: AwsContext, plan, cfg: SageMakerTuneConfig, sdk: str = "auto", wait: bool = False) -> str:
    """Create the tuning job through SDK v2's ``HyperparameterTuner`` over the plan's estimator;
    returns its name."""
    from twotower_lit.aws.training import _sdk_environment, resolve_sdk, v2_estimator

    params = _space(cfg)
    check_objective(cfg, plan.metric_definitions)
    sdk = resolve_sdk(sdk)
    if sdk != "v2":
        raise RuntimeError("Automatic Model Tuning is launched through SDK v2's HyperparameterTuner over the "
                           "training job's PyTorch estimator: run entrypoints.sagemaker_tune with "
                           ".venv-sagemaker-v2/bin/python (scripts/setup.sh builds it)")
    name = tuning_job_name(ctx, cfg)
    with _sdk_environment(ctx):
        from sagemaker.tuner import CategoricalParameter, ContinuousParameter, HyperparameterTuner, IntegerParameter

        estimator, inputs = v2_estimator(ctx, plan)  # (the tuner leaves the tuned names out of its static values)
        ranges = {}
        for p in params:
            if p.kind == "categorical":
                ranges[p.name] = CategoricalParameter([str(c) for c in p.choices])
            else:
                kind = ContinuousParameter if p.kind == "float" else IntegerParameter
                ranges[p.name] = kind(p.low, p.high, scaling_type="Logarithmic" if p.log else "Linear")
        tuner = HyperparameterTuner(
            estimator, objective_metric_name=cfg.objective_metric, hyperparameter_ranges=ranges,
            metric_definitions=plan.metric_definitions, strategy=cfg.strategy, objective_type=objective_type(cfg),
            max_jobs=cfg.max_jobs, max_parallel_jobs=cfg.max_parallel_jobs, tags=plan.tags,
            early_stopping_type=cfg.early_stopping)
        tuner.fit(inputs, job_name=name, wait=wait)
        return tuner.latest_tuning_job.name


def describe_tuning_job(ctx: AwsContext, name: str) -> Dict[str, Any]:
    """Status, counts and the best training job so far (its hyperparameters and objective)."""
    d = ctx.sagemaker.describe_hyper_parameter_tuning_job(HyperParameterTuningJobName=name)
    keys = ("HyperParameterTuningJobName", "HyperParameterTuningJobStatus", "TrainingJobStatusCounters",
            "ObjectiveStatusCounters", "BestTrainingJob", "FailureReason")
    return {k: d[k] for k in keys if k in d}
