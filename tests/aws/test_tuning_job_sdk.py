"""Automatic Model Tuning through the installed SageMaker SDK, against moto: SDK v2's
HyperparameterTuner over the training job's estimator sends the project's tuning config; SDK v3
is refused with the environment to use. Runs in .venv-sagemaker-v2 and -v3 (test_sdk_environments.py)."""
import json

import pytest

from twotower_lit.aws.config import SageMakerTrainConfig
from twotower_lit.aws.training import installed_sdk, plan_training_job
from twotower_lit.aws.tuning import SageMakerTuneConfig, describe_tuning_job, start_tuning_job, tuning_job_config
from twotower_lit.config import TrainConfig
from twotower_lit.options import from_dict
from twotower_lit.tuning.space import load_space

SDK = installed_sdk()
pytestmark = pytest.mark.skipif(SDK is None, reason="no SageMaker Python SDK in this environment "
                                                    "(see requirements/aws.txt, requirements/sdk-v3.txt)")


def _sorted(ranges):
    """Ranges by name; categorical values decoded: SDK v2 JSON-encodes a framework estimator's values
    (as it does its static hyperparameters) and the training toolkit decodes them in the container."""
    out = {kind: sorted(values, key=lambda r: r["Name"]) for kind, values in ranges.items() if values}
    for r in out.get("CategoricalParameterRanges", []):
        r["Values"] = [json.loads(v) if v.startswith('"') else v for v in r["Values"]]
    return out


def test_tuning_job_through_the_installed_sdk(ctx, request_log, tmp_path):
    job = SageMakerTrainConfig(sdk=SDK, instance_type="ml.g5.2xlarge", max_run=3600)
    cfg = from_dict(TrainConfig, {"data_dir": "s3://bucket/data", "max_epochs": 4, "batch_size": 2048})
    plan = plan_training_job(ctx, cfg, job, str(tmp_path), sdk=SDK)
    tune = SageMakerTuneConfig(max_jobs=5, max_parallel_jobs=2)
    if SDK != "v2":
        with pytest.raises(RuntimeError, match=".venv-sagemaker-v2"):
            start_tuning_job(ctx, plan, tune)
        return
    name = start_tuning_job(ctx, plan, tune)
    req = request_log.calls("CreateHyperParameterTuningJob")[-1]
    assert req["HyperParameterTuningJobName"] == name
    mine = tuning_job_config(tune, load_space())
    sent = req["HyperParameterTuningJobConfig"]
    assert _sorted(sent["ParameterRanges"]) == _sorted(mine["ParameterRanges"])
    assert {k: v for k, v in sent.items() if k != "ParameterRanges"} == \
        {k: v for k, v in mine.items() if k != "ParameterRanges"}
    definition = req["TrainingJobDefinition"]
    tuned = {p.name for p in load_space()}
    static = definition["StaticHyperParameters"]
    assert not tuned & set(static) and static["max_epochs"] == '"4"' and static["batch_size"] == '"2048"'
    assert definition["AlgorithmSpecification"]["TrainingImage"] == plan.image_uri
    assert definition["AlgorithmSpecification"]["MetricDefinitions"] == plan.metric_definitions
    resources = definition.get("ResourceConfig") or definition["HyperParameterTuningResourceConfig"]
    assert resources["InstanceType"] == "ml.g5.2xlarge"
    assert describe_tuning_job(ctx, name)["HyperParameterTuningJobName"] == name
