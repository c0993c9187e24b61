"""SageMaker Automatic Model Tuning, checked offline: the tuning job's config (the search space as
parameter ranges, the objective among the training job's metric definitions) against botocore's
model and moto, refusals before anything is sent, and the dry run of entrypoints.sagemaker_tune.
What the SDK sends is checked in test_tuning_job_sdk.py, in the SDK environments."""
import json

import pytest

from twotower_lit.aws.config import SageMakerTrainConfig
from twotower_lit.aws.hyperparameters import metric_definitions
from twotower_lit.aws.session import check_request
from twotower_lit.aws.training import plan_training_job
from twotower_lit.aws.tuning import SageMakerTuneConfig, check_objective, describe_tuning_job, tuning_job_config
from twotower_lit.config import TrainConfig
from twotower_lit.options import from_dict
from twotower_lit.tuning.space import load_space


def _request(ctx, plan, name, config):
    """CreateHyperParameterTuningJob as the SDK builds it from the plan (the parts the project decides)."""
    return {"HyperParameterTuningJobName": name, "HyperParameterTuningJobConfig": config,
            "TrainingJobDefinition": {
                "StaticHyperParameters": {k: v for k, v in plan.hyperparameters.items()
                                          if k not in {p["Name"] for r in config["ParameterRanges"].values()
                                                       for p in r}},
                "AlgorithmSpecification": {"TrainingImage": plan.image_uri, "TrainingInputMode": "File",
                                           "MetricDefinitions": plan.metric_definitions},
                "RoleArn": plan.role, "OutputDataConfig": {"S3OutputPath": plan.output_path},
                "ResourceConfig": {"InstanceType": plan.instance_type, "InstanceCount": plan.instance_count,
                                   "VolumeSizeInGB": plan.volume_size},
                "StoppingCondition": {"MaxRuntimeInSeconds": plan.max_run}},
            "Tags": plan.tags}


def test_the_tuning_job_is_valid_and_moto_keeps_it(ctx, request_log, tmp_path):
    plan = plan_training_job(ctx, from_dict(TrainConfig, {"max_epochs": 2}),
                             SageMakerTrainConfig(instance_type="ml.g5.2xlarge"), str(tmp_path), upload=False, sdk="v2")
    tune = SageMakerTuneConfig(max_jobs=6, max_parallel_jobs=3)
    config = tuning_job_config(tune, load_space())
    # the validation metric each epoch reports: AMT's early stopping sees it during the job, the test split stays out
    assert config["HyperParameterTuningJobObjective"] == {"Type": "Maximize", "MetricName": "val:recall@10"}
    assert config["Strategy"] == "Bayesian" and config["TrainingJobEarlyStoppingType"] == "Auto"
    assert config["ResourceLimits"] == {"MaxNumberOfTrainingJobs": 6, "MaxParallelTrainingJobs": 3}
    names = {m["Name"] for m in plan.metric_definitions}
    assert names >= {"val:recall@10", "val:auc", "test:recall@10", "test:logloss"}
    request = _request(ctx, plan, "tt-tune-1", config)
    check_request("sagemaker", "CreateHyperParameterTuningJob", request)  # botocore's model, before sending
    ctx.sagemaker.create_hyper_parameter_tuning_job(**request)
    sent = request_log.calls("CreateHyperParameterTuningJob")[-1]
    assert sent["HyperParameterTuningJobConfig"] == config
    desc = describe_tuning_job(ctx, "tt-tune-1")
    assert desc["HyperParameterTuningJobName"] == "tt-tune-1" and desc["HyperParameterTuningJobStatus"]
    assert tuning_job_config(SageMakerTuneConfig(objective_metric="test:logloss"), load_space())[
        "HyperParameterTuningJobObjective"]["Type"] == "Minimize"


@pytest.mark.parametrize("tune, message", [
    (SageMakerTuneConfig(objective_metric="val:ndcg@10"), "the training job reports test:auc"),
    (SageMakerTuneConfig(max_jobs=2, max_parallel_jobs=3), "need 1 <= parallel jobs <= jobs"),
    (SageMakerTuneConfig(strategy="Grid"), "Grid takes categorical parameters only"),
])
def test_refusals_before_anything_is_sent(tune, message):
    with pytest.raises(ValueError, match=message):
        check_objective(tune, metric_definitions(10))


def test_dry_run_prints_the_tuning_job(ctx, capsys):
    from entrypoints.sagemaker_tune import main

    argv = ["--dry-run", "--data-dir", "s3://bucket/data", "--max-epochs", "3", "--max-jobs", "4", "--role", ctx.role,
            "--region", ctx.region, "--bucket", ctx.cfg.bucket, "--endpoint-url", ctx.endpoint_url,
            "--project", ctx.cfg.project]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["config"]["ResourceLimits"]["MaxNumberOfTrainingJobs"] == 4
    assert out["training_job"]["hyperparameters"]["max_epochs"] == "3"
    assert out["tuning_job"].startswith(ctx.cfg.project[:10]) and len(out["tuning_job"]) <= 32
