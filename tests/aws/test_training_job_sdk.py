"""The training job through the installed SageMaker SDK, against moto: SDK v2's PyTorch estimator
`.fit()` or SDK v3's `ModelTrainer.train()`. The two SDKs cannot share an environment: this file
runs in .venv-sagemaker-v2 and in .venv-sagemaker-v3 (requirements/sdk-*.txt) and is skipped
where neither is installed."""
import io
import json
import tarfile

import pytest

from twotower_lit.aws.config import SageMakerTrainConfig
from twotower_lit.aws.environment import CHECKPOINT_LOCAL_PATH
from twotower_lit.aws.hyperparameters import from_hyperparameters
from twotower_lit.aws.session import parse_s3_uri
from twotower_lit.aws.training import describe_training_job, installed_sdk, plan_training_job, start_training_job
from twotower_lit.config import TrainConfig
from twotower_lit.options import replace_options

SDK = installed_sdk()
pytestmark = pytest.mark.skipif(SDK is None, reason="no SageMaker Python SDK in this environment "
                                                    "(see requirements/aws.txt, requirements/sdk-v3.txt)")


def objects(ctx, uri):
    bucket, prefix = parse_s3_uri(uri)
    return {o["Key"][len(prefix):].lstrip("/"): o["Key"]
            for o in ctx.s3.list_objects_v2(Bucket=bucket, Prefix=prefix).get("Contents", [])}


# (first: run after the job launched below, its reads of moto's S3 hang under SDK v3; unexplained)
def test_processes_per_host_and_the_checkpoint_prefix_reach_the_request(ctx, request_log, tmp_path):
    """--processes-per-host reaches what starts torchrun in the container, and the job's
    checkpoints live under the job's own name, with either SDK."""
    job = SageMakerTrainConfig(sdk=SDK, instance_type="ml.g5.12xlarge", processes_per_host=2,
                               checkpoint_s3_uri="auto", image_uri="123456789012.dkr.ecr.us-east-1.amazonaws.com/t:1",
                               image_torch="2.13.0")
    plan = plan_training_job(ctx, replace_options(TrainConfig(), max_epochs=1), job, str(tmp_path / "work"))
    name = start_training_job(ctx, plan, wait=False)
    req = request_log.calls("CreateTrainingJob")[-1]
    assert req["TrainingJobName"] == name
    checkpoint_uri = req["CheckpointConfig"]["S3Uri"].rstrip("/")
    assert name in checkpoint_uri.split("/"), (name, checkpoint_uri)
    assert checkpoint_uri.startswith(f"s3://{ctx.cfg.bucket}/{ctx.cfg.prefix}/")
    if SDK == "v2":
        assert checkpoint_uri == plan.checkpoint_s3_uri == ctx.s3_uri("checkpoints", name)
        # the training toolkit starts torchrun with --nproc_per_node from this hyperparameter
        assert json.loads(req["HyperParameters"]["sagemaker_mpi_num_of_processes_per_host"]) == 2
    else:
        channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"] for c in req["InputDataConfig"]}
        drivers = objects(ctx, channels["sm_drivers"])
        bucket, _ = parse_s3_uri(channels["sm_drivers"])
        distributed = json.loads(ctx.s3.get_object(Bucket=bucket, Key=drivers["distributed.json"])["Body"].read())
        assert distributed["process_count_per_node"] == 2


def test_training_job_through_the_installed_sdk(ctx, request_log, tmp_path):
    data = tmp_path / "prepared"
    (data / "train").mkdir(parents=True)
    (data / "manifest.json").write_text('{"schema_version": 1}')
    (data / "train" / "part-00000.parquet").write_bytes(b"PAR1" + b"\0" * 100)
    cfg = replace_options(TrainConfig(), data_dir=str(data), max_epochs=2, batch_size=512,
                          mlflow_uri="http://mlflow.internal:5000")
    cfg.model.user_layers = [64, 32]
    cfg.model.item_layers = [64, 32]
    job = SageMakerTrainConfig(sdk=SDK, instance_type="ml.g5.12xlarge", instance_count=2, spot=True,
                               volume_size=100, max_run=7200)
    plan = plan_training_job(ctx, cfg, job, str(tmp_path / "work"))
    name = start_training_job(ctx, plan, sdk="auto", wait=True, logs=True)

    req = request_log.calls("CreateTrainingJob")[-1]  # recorded and validated against botocore's model
    assert req["TrainingJobName"] == name and req["RoleArn"] == ctx.role
    assert req["AlgorithmSpecification"]["TrainingImage"] == plan.image_uri
    assert plan.image_uri.endswith("/huggingface-pytorch-training:2.11.0-transformers5.13.1-cu130-amzn2023")
    assert req["ResourceConfig"]["InstanceType"] == "ml.g5.12xlarge" and req["ResourceConfig"]["InstanceCount"] == 2
    assert req["ResourceConfig"]["VolumeSizeInGB"] == 100
    assert req["EnableManagedSpotTraining"] is True
    assert req["StoppingCondition"] == {"MaxRuntimeInSeconds": 7200, "MaxWaitTimeInSeconds": 14400}
    assert req["CheckpointConfig"]["LocalPath"] == CHECKPOINT_LOCAL_PATH
    assert req["OutputDataConfig"]["S3OutputPath"].rstrip("/") == plan.output_path
    channels = {c["ChannelName"]: c["DataSource"]["S3DataSource"]["S3Uri"].rstrip("/") for c in req["InputDataConfig"]}
    assert channels["data"] == plan.channels["data"] == ctx.s3_uri("data", "prepared")
    assert set(objects(ctx, channels["data"])) == {"manifest.json", "train/part-00000.parquet"}
    assert {"Key": "project", "Value": ctx.cfg.project} in req["Tags"]
    assert [m["Name"] for m in req["AlgorithmSpecification"]["MetricDefinitions"]] == \
        [m["Name"] for m in plan.metric_definitions]

    # the stored hyperparameters decode to the same TrainConfig (spot + checkpoints -> resume auto)
    hps = req["HyperParameters"]
    expected = replace_options(TrainConfig(), max_epochs=2, batch_size=512, mlflow_uri="http://mlflow.internal:5000",
                               resume="auto")
    expected.model.user_layers = expected.model.item_layers = [64, 32]
    assert from_hyperparameters({k: v for k, v in hps.items() if k in plan.hyperparameters}) == expected
    assert set(plan.hyperparameters) <= set(hps)

    if SDK == "v2":
        assert json.loads(hps["sagemaker_program"]) == "entrypoints/train.py"
        assert json.loads(hps["sagemaker_torch_distributed_enabled"]) is True
        assert "sagemaker_mpi_num_of_processes_per_host" not in hps  # the toolkit's default: one per GPU
        code_uri = json.loads(hps["sagemaker_submit_directory"])
        bucket, key = parse_s3_uri(code_uri)
        with tarfile.open(fileobj=io.BytesIO(ctx.s3.get_object(Bucket=bucket, Key=key)["Body"].read())) as tar:
            shipped = set(tar.getnames())
        assert code_uri.startswith(ctx.s3_uri("code"))
    else:
        shipped = set(objects(ctx, channels["code"]))
        drivers = objects(ctx, channels["sm_drivers"])
        bucket, _ = parse_s3_uri(channels["sm_drivers"])
        script = ctx.s3.get_object(Bucket=bucket, Key=drivers["sm_train.sh"])["Body"].read().decode()
        assert "distributed_drivers/torchrun_driver.py" in script and "requirements.txt" in script
        sourcecode = json.loads(ctx.s3.get_object(Bucket=bucket, Key=drivers["sourcecode.json"])["Body"].read())
        assert sourcecode["entry_script"] == "entrypoints/train.py"
    assert {"entrypoints/train.py", "entrypoints/inference.py", "requirements.txt",
            "twotower_lit/aws/environment.py", "twotower_lit/training/job.py"} <= shipped

    assert describe_training_job(ctx, name)["TrainingJobStatus"] == "Completed"


def test_our_image_uris_match_the_sdks_lookup():
    if SDK == "v2":
        from sagemaker import image_uris
        retrieve = image_uris.retrieve
        import os

        import sagemaker
        config = os.path.join(os.path.dirname(sagemaker.__file__), "image_uri_config", "pytorch.json")
    else:
        from sagemaker.core import image_uris
        retrieve = image_uris.retrieve
        import os

        import sagemaker.core
        config = os.path.join(os.path.dirname(sagemaker.core.__file__), "image_uri_config", "pytorch.json")
    from twotower_lit.aws.container import dlc_image_uri

    with open(config) as f:
        regions = sorted(json.load(f)["training"]["versions"]["2.8.0"]["registries"])
    cases = [(r, "training", "2.8.0", "ml.g5.2xlarge") for r in regions]  # every region's registry
    cases += [(r, s, v, i) for r in ("us-east-1", "eu-south-1", "cn-north-1") for s, v in
              (("training", "2.8.0"), ("inference", "2.6.0")) for i in ("ml.m5.xlarge", "ml.g5.2xlarge")]
    for region, scope, version, instance in cases:
        sdk = retrieve("pytorch", region=region, version=version, py_version="py312", instance_type=instance,
                       image_scope=scope)
        assert dlc_image_uri(region, scope, version, "py312", instance) == sdk, (region, scope, instance)
    assert len(regions) >= 30
