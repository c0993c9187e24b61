"""Typed configuration of the AWS jobs: where calls go, the training job, the endpoint, the shadow test.

Same conventions as `twotower_lit.config` (and the same helpers): field ``foo_bar`` is the
command-line option ``--foo-bar``, defaults live here and nowhere else. Leaf names are unique
across these dataclasses and `TrainConfig`, so one parser can hold a `TrainConfig` and a
`SageMakerTrainConfig` side by side (`entrypoints.sagemaker_train`).

Switching from the offline stack (a moto server) to a real account is one setting:
``AwsConfig.endpoint_url`` (``--endpoint-url``); left empty, calls go to AWS.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Optional, Tuple, Type

from twotower_lit.options import opt as _opt, from_dict, option_names

# The newest AWS PyTorch inference image the SDKs know (November 2026). The training image is
# chosen in twotower_lit/aws/container.py (it must carry the torch that TorchRec needs).
DEFAULT_INFERENCE_FRAMEWORK = "2.6.0"
# SageMaker's limits, checked before a request is sent
MAX_TRAINING_RUNTIME = 28 * 24 * 3600  # MaxRuntimeInSeconds of a training job
MAX_EXPERIMENT_HOURS = 30 * 24  # an inference experiment's schedule


@dataclass
class AwsConfig:
    """Where AWS calls go, and how the project's resources are named and tagged."""

    endpoint_url: Optional[str] = _opt(None, "send every AWS call to this URL (a moto server); empty: real AWS "
                                             "($AWS_ENDPOINT_URL is honoured too)")
    region: Optional[str] = _opt(None, "AWS region (default: $AWS_REGION / $AWS_DEFAULT_REGION / the profile's)")
    profile: Optional[str] = _opt(None, "AWS credentials profile (default: the standard credential chain)")
    role: Optional[str] = _opt(None, "SageMaker execution role ARN (default: $SAGEMAKER_ROLE_ARN)")
    bucket: Optional[str] = _opt(None, "S3 bucket for data, code, models and capture "
                                       "(default: sagemaker-<region>-<account>, created if missing)")
    prefix: str = _opt("twotower", "key prefix of everything the project writes to the bucket")
    project: str = _opt("twotower-lit", "value of the 'project' tag put on every resource created; "
                                        "cleanup deletes what carries it")
    tags: Optional[str] = _opt(None, "extra tags for every resource: 'key=value,key2=value2'")


@dataclass
class SageMakerTrainConfig:
    """The SageMaker training job around a `TrainConfig` (`entrypoints.sagemaker_train`)."""

    sdk: str = _opt("auto", "SageMaker Python SDK: v2 (PyTorch estimator, the workshop's), v3 (ModelTrainer + "
                            "Torchrun) or auto (whichever is installed; v2 if both could be)", ("auto", "v2", "v3"))
    job_name: Optional[str] = _opt(None, "training job name (default: <project>-<UTC timestamp>; SDK v3 always "
                                         "appends its own timestamp)")
    instance_type: str = _opt("ml.g5.2xlarge", "training instance type")
    instance_count: int = _opt(1, "training instances (nodes)")
    processes_per_host: Optional[int] = _opt(None, "processes per instance (default: its GPUs, or 1 on CPU)")
    image_uri: Optional[str] = _opt(None, "training image (default, GPU instances: AWS's Hugging Face PyTorch "
                                          "training image with torch 2.11.0); give its torch with --image-torch")
    image_torch: Optional[str] = _opt(None, "torch version inside --image-uri (2.11.x or 2.13.x): the job installs "
                                            "the fbgemm-gpu and torchrec built for it, and never torch itself")
    image_has_torchrec: bool = _opt(False, "the image already has fbgemm-gpu and torchrec: install neither")
    volume_size: int = _opt(50, "GB of disk per instance")
    max_run: int = _opt(24 * 3600, "seconds the job may run (SageMaker's limit: 28 days)")
    spot: bool = _opt(False, "managed spot training (resumes from --checkpoint-s3-uri after an interruption)")
    max_wait: Optional[int] = _opt(None, "spot: seconds to wait for capacity plus run (default 2 x --max-run)")
    checkpoint_s3_uri: Optional[str] = _opt(None, "S3 prefix SageMaker syncs /opt/ml/checkpoints with; the job "
                                                  "resumes from the latest checkpoint there ('auto': "
                                                  "s3://BUCKET/PREFIX/checkpoints/<job>; default with --spot)")
    output_path: Optional[str] = _opt(None, "S3 prefix for model.tar.gz and output.tar.gz "
                                            "(default s3://BUCKET/PREFIX/training)")
    data_s3_uri: Optional[str] = _opt(None, "where a local --data-dir is uploaded (default "
                                            "s3://BUCKET/PREFIX/data/<folder name>)")
    wait: bool = _opt(True, "wait for the job to finish (false: start it and return)")
    logs: bool = _opt(True, "while waiting, stream the job's CloudWatch logs")


@dataclass
class DeployConfig:
    """A real-time endpoint serving an exported model (`entrypoints.sagemaker_deploy`)."""

    model: Optional[str] = _opt(None, "what to serve: an exported model directory, a model.tar.gz (local or s3://) "
                                      "or 'job:<training job name>' (its model artifacts)")
    endpoint_name: str = _opt("twotower", "endpoint name")
    variant_name: str = _opt("production", "production variant name")
    model_name: Optional[str] = _opt(None, "SageMaker model name (default <endpoint>-<variant>-<timestamp>)")
    serving_instance_type: str = _opt("ml.m5.large", "endpoint instance type")
    serving_instance_count: int = _opt(1, "endpoint instances")
    serving_image: Optional[str] = _opt(None, "inference image: default AWS's PyTorch inference image "
                                              "(--inference-framework); or the URI of our own image (Dockerfile)")
    inference_framework: str = _opt(DEFAULT_INFERENCE_FRAMEWORK, "PyTorch version of AWS's inference image")
    serving_env: Optional[str] = _opt(None, "extra container environment 'NAME=value,...' (e.g. TWOTOWER_MAX_K=50)")
    capture: bool = _opt(False, "enable data capture (input and output) on the endpoint")
    capture_percent: int = _opt(100, "share of requests captured (0-100)")
    capture_s3_uri: Optional[str] = _opt(None, "data capture destination (default s3://BUCKET/PREFIX/capture)")
    wait_timeout: int = _opt(1800, "seconds to wait for the endpoint to be InService")
    smoke_user: int = _opt(1, "raw user id of the smoke invocation after deployment")


@dataclass
class ShadowTestConfig:
    """A shadow test on SageMaker (`entrypoints.sagemaker_shadow`)."""

    endpoint_name: str = _opt("twotower", "endpoint under test")
    production_model: Optional[str] = _opt(None, "SageMaker model of the production variant")
    shadow_model: Optional[str] = _opt(None, "SageMaker model of the shadow variant")
    production_variant: str = _opt("production", "production variant name")
    shadow_variant: str = _opt("shadow", "shadow variant name")
    route: str = _opt("endpoint-config", "endpoint-config: an endpoint config with ShadowProductionVariants; "
                                         "experiment: an inference experiment (ShadowMode) on the endpoint",
                      ("endpoint-config", "experiment"))
    sampling_percent: int = _opt(100, "share of production requests copied to the shadow (experiment route)")
    instance_type: str = _opt("ml.m5.large", "instance type of both variants")
    instance_count: int = _opt(1, "instances per variant")
    capture_percent: int = _opt(100, "share of requests captured")
    capture_s3_uri: Optional[str] = _opt(None, "data capture destination (default s3://BUCKET/PREFIX/capture)")
    experiment_name: Optional[str] = _opt(None, "inference experiment name (start: default "
                                                "<endpoint>-shadow-<UTC timestamp>; stop/promote: default the "
                                                "endpoint's one active experiment)")
    duration_hours: int = _opt(24, "experiment schedule: it ends this many hours after it starts (at most 720, "
                                   "SageMaker's 30 days)")
    wait_timeout: int = _opt(1800, "seconds to wait for the endpoint / experiment state changes")
    poll_seconds: float = _opt(15.0, "seconds between status checks while waiting")
    metrics_period: int = _opt(60, "CloudWatch period (seconds) of the per-variant metrics")


def split_namespace(ns: argparse.Namespace, *classes: Type[Any]) -> Tuple[Any, ...]:
    """One instance per config class from a namespace that holds options of several of them
    (each option goes to the classes that have a leaf of that name)."""
    values = vars(ns)
    out = []
    for cls in classes:
        names = option_names(cls)
        out.append(from_dict(cls, {k: v for k, v in values.items() if k in names}))
    unknown = set(values) - set().union(*(option_names(cls) for cls in classes))
    if unknown:
        raise ValueError(f"options not in any config: {', '.join(sorted(unknown))}")
    return tuple(out)
