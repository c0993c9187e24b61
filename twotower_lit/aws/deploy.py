"""A real-time endpoint: model.tar.gz in S3 -> model -> endpoint config -> endpoint -> smoke call.

boto3 only (no SageMaker SDK), so it runs from the project's own environment. The request
bodies are built by small pure functions (`model_request`, `production_variant`,
`data_capture_config`, `endpoint_config_request`) that the shadow test reuses and the tests
validate against botocore's service model.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Sequence

from botocore.exceptions import ClientError

from twotower_lit.aws import container
from twotower_lit.aws.config import DeployConfig
from twotower_lit.aws.s3 import upload_file
from twotower_lit.aws.session import AwsContext, parse_key_values, resource_name

log = logging.getLogger(__name__)

JSON = "application/json"
_ENDPOINT_FAILED = ("Failed", "OutOfService", "RollingBack", "Deleting")


# what to serve ---------------------------------------------------------------------------------

def model_data_uri(ctx: AwsContext, model: str, name: str) -> str:
    """S3 URI of the model.tar.gz for `model`: an exported model directory (packaged here), a
    local model.tar.gz (uploaded), an s3:// URI (as is) or ``job:<training job>`` (its artifacts)."""
    if model.startswith("s3://"):
        return model
    if model.startswith("job:"):
        from twotower_lit.aws.training import model_artifacts

        return model_artifacts(ctx, model[len("job:"):])
    target = ctx.s3_uri("models", name, "model.tar.gz")
    if os.path.isdir(model):
        from twotower_lit.serving.package import package_model

        with tempfile.TemporaryDirectory() as tmp:
            return upload_file(ctx.s3, package_model(model, os.path.join(tmp, "model.tar.gz")), target)
    if os.path.isfile(model) and model.endswith(".tar.gz"):
        return upload_file(ctx.s3, model, target)
    raise FileNotFoundError(f"--model {model}: not an exported model directory, a model.tar.gz, an s3:// URI "
                            "or job:<training job name>")


def serving_image(ctx: AwsContext, cfg: DeployConfig, instance_type: Optional[str] = None) -> str:
    """Our own image when given, else AWS's PyTorch inference image for the instance type."""
    if cfg.serving_image:
        return cfg.serving_image
    return container.dlc_image_uri(ctx.region, "inference", cfg.inference_framework, "py312",
                                   instance_type or cfg.serving_instance_type)


def is_aws_inference_image(image: str) -> bool:
    return "/pytorch-inference:" in image


# request bodies --------------------------------------------------------------------------------

def model_request(ctx: AwsContext, name: str, image: str, model_data: str,
                  env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """CreateModel: AWS's inference image loads ``code/inference.py`` from model.tar.gz; our own
    image's ``serve`` reads the model from /opt/ml/model and its settings from TWOTOWER_*."""
    environment = container.serving_environment(extra=env) if is_aws_inference_image(image) else dict(env or {})
    return {"ModelName": name, "ExecutionRoleArn": ctx.role,
            "PrimaryContainer": {"Image": image, "ModelDataUrl": model_data, "Environment": environment},
            "Tags": ctx.tags()}


def production_variant(model_name: str, variant_name: str, instance_type: str, instance_count: int = 1,
                       weight: float = 1.0) -> Dict[str, Any]:
    return {"VariantName": variant_name, "ModelName": model_name, "InstanceType": instance_type,
            "InitialInstanceCount": instance_count, "InitialVariantWeight": weight}


def data_capture_config(destination: str, percent: int = 100) -> Dict[str, Any]:
    """Capture request and response bodies (JSON as text) of every variant, production and shadow."""
    if not 0 <= percent <= 100:
        raise ValueError(f"capture percentage {percent} is not in 0..100")
    return {"EnableCapture": True, "InitialSamplingPercentage": int(percent), "DestinationS3Uri": destination,
            "CaptureOptions": [{"CaptureMode": "Input"}, {"CaptureMode": "Output"}],
            "CaptureContentTypeHeader": {"JsonContentTypes": [JSON]}}


def endpoint_config_request(ctx: AwsContext, name: str, production: List[Dict[str, Any]],
                            shadow: Optional[List[Dict[str, Any]]] = None,
                            capture: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    request: Dict[str, Any] = {"EndpointConfigName": name, "ProductionVariants": production, "Tags": ctx.tags()}
    if shadow:
        request["ShadowProductionVariants"] = shadow
    if capture:
        request["DataCaptureConfig"] = capture
    return request


# calls -----------------------------------------------------------------------------------------

def endpoint_status(ctx: AwsContext, endpoint: str) -> Optional[str]:
    """The endpoint's status, or None when it does not exist."""
    try:
        return ctx.sagemaker.describe_endpoint(EndpointName=endpoint)["EndpointStatus"]
    except ClientError as e:
        if e.response["Error"]["Code"] == "ValidationException" and "Could not find" in str(e):
            return None
        raise


def create_or_update_endpoint(ctx: AwsContext, endpoint: str, config_name: str) -> str:
    """Create the endpoint on `config_name`, or move an existing one to it (a blue/green update
    without downtime). Returns 'created' or 'updated'."""
    if endpoint_status(ctx, endpoint) is None:
        ctx.sagemaker.create_endpoint(EndpointName=endpoint, EndpointConfigName=config_name, Tags=ctx.tags())
        return "created"
    ctx.sagemaker.update_endpoint(EndpointName=endpoint, EndpointConfigName=config_name)
    return "updated"


def wait_for_status(describe: Callable[[], Dict], key: str, done: str, failed: Sequence[str], what: str,
                    timeout: float, poll: float) -> Dict:
    """Poll `describe` until its `key` is `done` (returns the description); raise with SageMaker's
    FailureReason when it reaches one of `failed`, or a TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        desc = describe()
        status = desc[key]
        if status == done:
            return desc
        if status in failed:
            raise RuntimeError(f"{what} is {status}: {desc.get('FailureReason', 'no reason given')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} still {status} after {timeout:.0f} s")
        time.sleep(poll)


def wait_for_endpoint(ctx: AwsContext, endpoint: str, timeout: float = 1800.0, poll: float = 15.0) -> Dict:
    """Poll until the endpoint is InService; raise with SageMaker's FailureReason if it fails."""
    return wait_for_status(lambda: ctx.sagemaker.describe_endpoint(EndpointName=endpoint), "EndpointStatus",
                           "InService", _ENDPOINT_FAILED, f"endpoint {endpoint}", timeout, poll)


def invoke(ctx: AwsContext, endpoint: str, body: Dict[str, Any], inference_id: Optional[str] = None,
           target_variant: Optional[str] = None) -> Dict[str, Any]:
    """One invocation through sagemaker-runtime; returns the decoded JSON answer plus the variant
    that produced it (``_variant``)."""
    params: Dict[str, Any] = {"EndpointName": endpoint, "Body": json.dumps(body).encode(), "ContentType": JSON,
                              "Accept": JSON, "InferenceId": inference_id or str(uuid.uuid4())}
    if target_variant:
        params["TargetVariant"] = target_variant
    response = ctx.client("sagemaker-runtime").invoke_endpoint(**params)
    answer = json.loads(response["Body"].read())
    answer["_variant"] = response.get("InvokedProductionVariant")
    return answer


def smoke_invoke(ctx: AwsContext, endpoint: str, user_id: int, k: int = 5) -> Dict[str, Any]:
    """Ask the endpoint for one user's top-k and check the answer has the serving contract's shape."""
    answer = invoke(ctx, endpoint, {"user_id": user_id, "k": k}, inference_id=f"smoke-{uuid.uuid4()}")
    preds = answer.get("predictions")
    if not isinstance(preds, list) or not preds or not isinstance(preds[0].get("items"), list):
        raise RuntimeError(f"endpoint {endpoint} answered without predictions: {json.dumps(answer)[:500]}")
    return answer


def deploy(ctx: AwsContext, cfg: DeployConfig, wait: bool = True) -> Dict[str, Any]:
    """Package/upload the model, create model + endpoint config (+ data capture), create or update
    the endpoint, wait, and smoke-test it. Returns the names and the smoke answer."""
    if not cfg.model:
        raise ValueError("--model is required (an exported model directory, model.tar.gz, s3:// URI or job:<name>)")
    model_name = cfg.model_name or resource_name(cfg.endpoint_name, cfg.variant_name, "@time")
    model_data = model_data_uri(ctx, cfg.model, model_name)
    image = serving_image(ctx, cfg)
    ctx.sagemaker.create_model(**model_request(ctx, model_name, image, model_data, parse_key_values(cfg.serving_env)))
    config_name = resource_name(cfg.endpoint_name, "@time")
    capture = (data_capture_config(cfg.capture_s3_uri or ctx.s3_uri("capture"), cfg.capture_percent)
               if cfg.capture else None)
    ctx.sagemaker.create_endpoint_config(**endpoint_config_request(
        ctx, config_name, [production_variant(model_name, cfg.variant_name, cfg.serving_instance_type,
                                              cfg.serving_instance_count)], capture=capture))
    action = create_or_update_endpoint(ctx, cfg.endpoint_name, config_name)
    out: Dict[str, Any] = {"endpoint": cfg.endpoint_name, "action": action, "model": model_name,
                           "endpoint_config": config_name, "model_data": model_data, "image": image}
    if wait:
        wait_for_endpoint(ctx, cfg.endpoint_name, cfg.wait_timeout)
        out["smoke"] = smoke_invoke(ctx, cfg.endpoint_name, cfg.smoke_user)
    return out
