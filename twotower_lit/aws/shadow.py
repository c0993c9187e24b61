"""Shadow tests on SageMaker, both routes.

endpoint-config route
    one endpoint config holding the production variant, one ``ShadowProductionVariants`` entry
    and a ``DataCaptureConfig`` (input and output of both variants); the endpoint is created on it
    or moved to it. SageMaker copies every request to the shadow; callers only ever get the
    production answer. Promotion = a new config whose only production variant serves the shadow's
    model, then ``update_endpoint``.
experiment route
    an inference experiment (``Type="ShadowMode"``) on an endpoint that already serves the
    production model: a sampling percentage, a data storage config and a schedule; started,
    stopped, and on stop the shadow can be promoted (``ModelVariantActions``).

Either way the traffic comes from the load generator through sagemaker-runtime, and the
captured JSON lines plus CloudWatch's per-variant metrics feed the same shadow report as the
local stack (`twotower_lit.aws.results`).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Dict, Optional

from twotower_lit.aws.config import ShadowTestConfig
from twotower_lit.aws.deploy import (create_or_update_endpoint, data_capture_config, endpoint_config_request,
                                     production_variant, wait_for_endpoint)
from twotower_lit.aws.session import AwsContext, resource_name

log = logging.getLogger(__name__)

_EXPERIMENT_DONE = ("Completed", "Cancelled")


def _models(cfg: ShadowTestConfig) -> None:
    if not cfg.production_model or not cfg.shadow_model:
        raise ValueError("--production-model and --shadow-model (SageMaker model names, e.g. from "
                         "entrypoints.sagemaker_deploy) are required")


def capture_destination(ctx: AwsContext, cfg: ShadowTestConfig) -> str:
    return cfg.capture_s3_uri or ctx.s3_uri("capture")


# endpoint-config route -------------------------------------------------------------------------

def shadow_endpoint_config_request(ctx: AwsContext, cfg: ShadowTestConfig, name: str) -> Dict[str, Any]:
    """CreateEndpointConfig with one production variant, one shadow variant and data capture."""
    _models(cfg)
    return endpoint_config_request(
        ctx, name,
        production=[production_variant(cfg.production_model, cfg.production_variant, cfg.instance_type,
                                       cfg.instance_count)],
        shadow=[production_variant(cfg.shadow_model, cfg.shadow_variant, cfg.instance_type, cfg.instance_count)],
        capture=data_capture_config(capture_destination(ctx, cfg), cfg.capture_percent))


def start_shadow_endpoint(ctx: AwsContext, cfg: ShadowTestConfig, wait: bool = True) -> Dict[str, Any]:
    """Create the shadow endpoint config and create/move the endpoint onto it."""
    name = resource_name(cfg.endpoint_name, "shadow", "@time")
    ctx.sagemaker.create_endpoint_config(**shadow_endpoint_config_request(ctx, cfg, name))
    action = create_or_update_endpoint(ctx, cfg.endpoint_name, name)
    if wait:
        wait_for_endpoint(ctx, cfg.endpoint_name, cfg.wait_timeout, cfg.poll_seconds)
    return {"endpoint": cfg.endpoint_name, "endpoint_config": name, "action": action,
            "capture": capture_destination(ctx, cfg)}


def single_variant_endpoint(ctx: AwsContext, cfg: ShadowTestConfig, model: str, label: str,
                            wait: bool = True) -> Dict[str, Any]:
    """Move the endpoint to a config whose only (production) variant serves `model`, capture kept."""
    _models(cfg)
    name = resource_name(cfg.endpoint_name, label, "@time")
    ctx.sagemaker.create_endpoint_config(**endpoint_config_request(
        ctx, name, [production_variant(model, cfg.production_variant, cfg.instance_type, cfg.instance_count)],
        capture=data_capture_config(capture_destination(ctx, cfg), cfg.capture_percent)))
    ctx.sagemaker.update_endpoint(EndpointName=cfg.endpoint_name, EndpointConfigName=name)
    if wait:
        wait_for_endpoint(ctx, cfg.endpoint_name, cfg.wait_timeout, cfg.poll_seconds)
    return {"endpoint": cfg.endpoint_name, "endpoint_config": name, "production_model": model}


def promote_shadow_endpoint(ctx: AwsContext, cfg: ShadowTestConfig, wait: bool = True) -> Dict[str, Any]:
    """The shadow's model becomes the production variant (same variant name); the shadow goes."""
    return single_variant_endpoint(ctx, cfg, cfg.shadow_model, "promoted", wait)


def stop_shadow_endpoint(ctx: AwsContext, cfg: ShadowTestConfig, wait: bool = True) -> Dict[str, Any]:
    """End the shadow test keeping production as it was."""
    return single_variant_endpoint(ctx, cfg, cfg.production_model, "production", wait)


# experiment route ------------------------------------------------------------------------------

def _variant(model: str, variant: str, cfg: ShadowTestConfig) -> Dict[str, Any]:
    return {"ModelName": model, "VariantName": variant,
            "InfrastructureConfig": {"InfrastructureType": "RealTimeInference",
                                     "RealTimeInferenceConfig": {"InstanceType": cfg.instance_type,
                                                                 "InstanceCount": cfg.instance_count}}}


def experiment_name(cfg: ShadowTestConfig) -> str:
    return cfg.experiment_name or resource_name(cfg.endpoint_name, "shadow")


def inference_experiment_request(ctx: AwsContext, cfg: ShadowTestConfig,
                                 start: Optional[dt.datetime] = None) -> Dict[str, Any]:
    """CreateInferenceExperiment (ShadowMode) on an endpoint that serves the production model."""
    _models(cfg)
    if not 0 <= cfg.sampling_percent <= 100:
        raise ValueError(f"--sampling-percent {cfg.sampling_percent} is not in 0..100")
    start = start or dt.datetime.now(dt.timezone.utc)
    return {
        "Name": experiment_name(cfg), "Type": "ShadowMode", "RoleArn": ctx.role, "EndpointName": cfg.endpoint_name,
        "Description": f"shadow test of {cfg.shadow_model} against {cfg.production_model}",
        "Schedule": {"StartTime": start, "EndTime": start + dt.timedelta(hours=cfg.duration_hours)},
        "ModelVariants": [_variant(cfg.production_model, cfg.production_variant, cfg),
                          _variant(cfg.shadow_model, cfg.shadow_variant, cfg)],
        "ShadowModeConfig": {"SourceModelVariantName": cfg.production_variant,
                             "ShadowModelVariants": [{"ShadowModelVariantName": cfg.shadow_variant,
                                                      "SamplingPercentage": int(cfg.sampling_percent)}]},
        "DataStorageConfig": {"Destination": capture_destination(ctx, cfg),
                              "ContentType": {"JsonContentTypes": ["application/json"]}},
        "Tags": ctx.tags(),
    }


def create_experiment(ctx: AwsContext, cfg: ShadowTestConfig) -> str:
    """Create the experiment and start it; returns its ARN."""
    arn = ctx.sagemaker.create_inference_experiment(**inference_experiment_request(ctx, cfg))["InferenceExperimentArn"]
    wait_for_experiment(ctx, experiment_name(cfg), ("Created", "Running"), cfg.wait_timeout, cfg.poll_seconds)
    return arn


def start_experiment(ctx: AwsContext, cfg: ShadowTestConfig, wait: bool = True) -> Dict[str, Any]:
    name = experiment_name(cfg)
    ctx.sagemaker.start_inference_experiment(Name=name)
    return wait_for_experiment(ctx, name, ("Running",), cfg.wait_timeout, cfg.poll_seconds) if wait else {"Name": name}


def stop_experiment(ctx: AwsContext, cfg: ShadowTestConfig, promote: bool = False, reason: str = "",
                    wait: bool = True) -> Dict[str, Any]:
    """Stop the experiment. ``promote``: the shadow replaces production (``Promote`` the shadow,
    ``Remove`` production; the experiment ends Completed); otherwise production is retained, the
    shadow removed, and the experiment ends Cancelled."""
    name = experiment_name(cfg)
    actions = ({cfg.shadow_variant: "Promote", cfg.production_variant: "Remove"} if promote
               else {cfg.production_variant: "Retain", cfg.shadow_variant: "Remove"})
    params: Dict[str, Any] = {"Name": name, "ModelVariantActions": actions,
                              "DesiredState": "Completed" if promote else "Cancelled",
                              "Reason": reason or ("shadow promoted" if promote else "shadow test stopped")}
    if promote:
        params["DesiredModelVariants"] = [_variant(cfg.shadow_model, cfg.shadow_variant, cfg)]
    ctx.sagemaker.stop_inference_experiment(**params)
    return (wait_for_experiment(ctx, name, _EXPERIMENT_DONE, cfg.wait_timeout, cfg.poll_seconds)
            if wait else {"Name": name})


def wait_for_experiment(ctx: AwsContext, name: str, states, timeout: float = 1800.0, poll: float = 15.0) -> Dict:
    deadline = time.monotonic() + timeout
    while True:
        desc = ctx.sagemaker.describe_inference_experiment(Name=name)
        if desc["Status"] in states:
            return desc
        if desc["Status"] in _EXPERIMENT_DONE and not set(states) & set(_EXPERIMENT_DONE):
            raise RuntimeError(f"inference experiment {name} is {desc['Status']}: {desc.get('StatusReason', '')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"inference experiment {name} still {desc['Status']} after {timeout:.0f} s")
        time.sleep(poll)


def variant_roles(ctx: AwsContext, endpoint: str) -> Dict[str, str]:
    """``{variant name: "production" | "shadow"}`` of an endpoint (describe_endpoint lists both kinds)."""
    desc = ctx.sagemaker.describe_endpoint(EndpointName=endpoint)
    roles = {v["VariantName"]: "production" for v in desc.get("ProductionVariants", [])}
    roles.update({v["VariantName"]: "shadow" for v in desc.get("ShadowProductionVariants", [])})
    return roles

