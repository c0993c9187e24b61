"""Shadow tests on SageMaker, both routes.

endpoint-config route
    one endpoint config holding the production variant, one ``ShadowProductionVariants`` entry
    and a ``DataCaptureConfig`` (input and output of both variants); the endpoint is created on it
    or moved to it. SageMaker copies every request to the shadow; callers only ever get the
    production answer. Promotion = a new config whose only production variant serves the shadow's
    model, then ``update_endpoint``.
experiment route
    an inference experiment (``Type="ShadowMode"``) on an endpoint that already serves the
    production model: a sampling percentage, a data storage config and a schedule from now to
    ``duration_hours`` later (SageMaker's limit: 30 days). SageMaker begins a created experiment
    at its scheduled start by itself (Creating -> Created -> Starting -> Running), so nothing calls
    StartInferenceExperiment: the launcher waits for Running. Stopping is asynchronous (Stopping ->
    Completed or Cancelled); on stop the shadow can be promoted (``ModelVariantActions``). Each
    experiment gets a name of its own (``<endpoint>-shadow-<UTC timestamp>``); stop and promote
    find the endpoint's active experiment when no name is given.

Either way the traffic comes from the load generator through sagemaker-runtime, and the
captured JSON lines plus CloudWatch's per-variant metrics feed the same shadow report as the
local stack (`twotower_lit.aws.results`).
"""
from __future__ import annotations

import datetime as dt
import logging
import time
from typing import Any, Dict, Optional

from twotower_lit.aws.config import MAX_EXPERIMENT_HOURS, ShadowTestConfig
from twotower_lit.aws.deploy import (create_or_update_endpoint, data_capture_config, endpoint_config_request,
                                     production_variant, wait_for_endpoint)
from twotower_lit.aws.session import AwsContext, resource_name

log = logging.getLogger(__name__)

EXPERIMENT_ENDED = ("Completed", "Cancelled")


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


EXPERIMENT_NAME_MAX = 120  # CreateInferenceExperiment's Name: [a-zA-Z0-9](-*[a-zA-Z0-9]){0,119}
_EXPERIMENT_ACTIVE = ("Creating", "Created", "Updating", "Starting", "Running", "Stopping")


def new_experiment_name(cfg: ShadowTestConfig) -> str:
    """The name of an experiment about to be created: the configured one, or a fresh
    ``<endpoint>-shadow-<UTC timestamp>`` (a second test on the endpoint must not collide)."""
    return cfg.experiment_name or resource_name(cfg.endpoint_name, "shadow", "@time", max_len=EXPERIMENT_NAME_MAX)


def active_experiment(ctx: AwsContext, cfg: ShadowTestConfig) -> str:
    """The configured experiment, or the one not yet ended on the endpoint (an error naming the
    candidates when there are several, or saying so when there is none)."""
    if cfg.experiment_name:
        return cfg.experiment_name
    names = []
    for page in ctx.sagemaker.get_paginator("list_inference_experiments").paginate(Type="ShadowMode"):
        for item in page.get("InferenceExperiments", []):
            if item["Status"] in _EXPERIMENT_ACTIVE:
                desc = ctx.sagemaker.describe_inference_experiment(Name=item["Name"])
                if desc.get("EndpointMetadata", {}).get("EndpointName") == cfg.endpoint_name:
                    names.append(item["Name"])
    if len(names) != 1:
        raise ValueError(f"{'no' if not names else str(len(names))} inference experiment(s) active on endpoint "
                         f"{cfg.endpoint_name}{': ' + ', '.join(names) if names else ''}; "
                         f"name one with --experiment-name")
    return names[0]


def inference_experiment_request(ctx: AwsContext, cfg: ShadowTestConfig, start: Optional[dt.datetime] = None,
                                 name: Optional[str] = None) -> Dict[str, Any]:
    """CreateInferenceExperiment (ShadowMode) on an endpoint that serves the production model,
    scheduled from `start` (default now) for ``duration_hours``."""
    _models(cfg)
    if not 0 <= cfg.sampling_percent <= 100:
        raise ValueError(f"--sampling-percent {cfg.sampling_percent} is not in 0..100")
    if not 0 < cfg.duration_hours <= MAX_EXPERIMENT_HOURS:
        raise ValueError(f"--duration-hours {cfg.duration_hours}: an inference experiment runs more than 0 and at "
                         f"most {MAX_EXPERIMENT_HOURS} hours (SageMaker's 30 days)")
    start = start or dt.datetime.now(dt.timezone.utc)
    return {
        "Name": name or new_experiment_name(cfg), "Type": "ShadowMode", "RoleArn": ctx.role,
        "EndpointName": cfg.endpoint_name,
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


def start_experiment(ctx: AwsContext, cfg: ShadowTestConfig, wait: bool = True) -> Dict[str, Any]:
    """Create the experiment, scheduled to start now: SageMaker starts it at that time itself.
    With `wait`, returns its description once Running."""
    request = inference_experiment_request(ctx, cfg)
    name = request["Name"]
    arn = ctx.sagemaker.create_inference_experiment(**request)["InferenceExperimentArn"]
    if not wait:
        return {"Name": name, "Arn": arn}
    return wait_for_experiment(ctx, name, ("Running",), cfg.wait_timeout, cfg.poll_seconds)


def stop_experiment(ctx: AwsContext, cfg: ShadowTestConfig, promote: bool = False, reason: str = "",
                    wait: bool = True) -> Dict[str, Any]:
    """Stop the experiment. ``promote``: the shadow replaces production (``Promote`` the shadow,
    ``Remove`` production; the experiment ends Completed); otherwise production is retained, the
    shadow removed, and the experiment ends Cancelled."""
    name = active_experiment(ctx, cfg)
    actions = ({cfg.shadow_variant: "Promote", cfg.production_variant: "Remove"} if promote
               else {cfg.production_variant: "Retain", cfg.shadow_variant: "Remove"})
    params: Dict[str, Any] = {"Name": name, "ModelVariantActions": actions,
                              "DesiredState": "Completed" if promote else "Cancelled",
                              "Reason": reason or ("shadow promoted" if promote else "shadow test stopped")}
    if promote:
        params["DesiredModelVariants"] = [_variant(cfg.shadow_model, cfg.shadow_variant, cfg)]
    ctx.sagemaker.stop_inference_experiment(**params)
    return (wait_for_experiment(ctx, name, EXPERIMENT_ENDED, cfg.wait_timeout, cfg.poll_seconds)
            if wait else {"Name": name})


def wait_for_experiment(ctx: AwsContext, name: str, states, timeout: float = 1800.0, poll: float = 15.0,
                        max_poll: float = 60.0) -> Dict:
    """Poll DescribeInferenceExperiment until its status is one of `states`, waiting `poll`
    seconds at first and 1.5 times longer after each check (at most `max_poll`); a TimeoutError
    after `timeout` seconds says which status it was stuck in."""
    deadline = time.monotonic() + timeout
    while True:
        desc = ctx.sagemaker.describe_inference_experiment(Name=name)
        if desc["Status"] in states:
            return desc
        if desc["Status"] in EXPERIMENT_ENDED and not set(states) & set(EXPERIMENT_ENDED):
            raise RuntimeError(f"inference experiment {name} is {desc['Status']}: {desc.get('StatusReason', '')}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"inference experiment {name} still {desc['Status']} after {timeout:.0f} s (waiting "
                               f"for {' or '.join(states)}); look at it in the SageMaker console, then run the "
                               f"command again")
        time.sleep(poll)
        poll = min(poll * 1.5, max_poll)
