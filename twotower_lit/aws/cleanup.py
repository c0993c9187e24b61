"""Delete what the project created, found by its ``project`` tag (`AwsContext.tags`).

SageMaker resources carry the tag (every create call here passes ``Tags=ctx.tags()``); they are
listed per kind and kept only when ``list_tags`` shows the project's value. Order matters:
running inference experiments are stopped (production retained) and, since stopping takes a
while (Stopping -> Cancelled), waited for, with backoff and a time limit, before they are deleted
and their endpoint goes (SageMaker refuses both with a ConflictException meanwhile); endpoints go
before their configs, configs before their models. Training jobs cannot be deleted:
those still running are stopped. S3 objects are not tagged; ``s3=True`` empties the project's
prefix (``s3://BUCKET/PREFIX/``), never the bucket.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, Iterable, List, Optional, Tuple

from twotower_lit.aws.s3 import delete_prefix, list_objects
from twotower_lit.aws.session import PROJECT_TAG, AwsContext
from twotower_lit.aws.shadow import EXPERIMENT_ENDED, wait_for_experiment

log = logging.getLogger(__name__)

# kind -> (list operation, list key, name key, ARN key in the listing, extra list arguments)
KINDS: Dict[str, Tuple[str, str, str, Optional[str], Dict]] = {
    # the experiment listing has no ARN (its describe has)
    "inference-experiment": ("list_inference_experiments", "InferenceExperiments", "Name", None, {}),
    "endpoint": ("list_endpoints", "Endpoints", "EndpointName", "EndpointArn", {}),
    "endpoint-config": ("list_endpoint_configs", "EndpointConfigs", "EndpointConfigName", "EndpointConfigArn", {}),
    "model": ("list_models", "Models", "ModelName", "ModelArn", {}),
    "training-job": ("list_training_jobs", "TrainingJobSummaries", "TrainingJobName", "TrainingJobArn",
                     {"StatusEquals": "InProgress"}),
    "mlflow-tracking-server": ("list_mlflow_tracking_servers", "TrackingServerSummaries", "TrackingServerName",
                               "TrackingServerArn", {}),
}
DEFAULT_KINDS = ("inference-experiment", "endpoint", "endpoint-config", "model", "training-job")


def _tagged(ctx: AwsContext, arn: str) -> bool:
    sm = ctx.sagemaker
    kwargs = {"ResourceArn": arn}
    while True:
        page = sm.list_tags(**kwargs)
        if any(t["Key"] == PROJECT_TAG and t["Value"] == ctx.cfg.project for t in page.get("Tags", [])):
            return True
        if not page.get("NextToken"):
            return False
        kwargs["NextToken"] = page["NextToken"]


def find_resources(ctx: AwsContext, kinds: Iterable[str] = DEFAULT_KINDS) -> Dict[str, List[str]]:
    """``{kind: [names]}`` of the resources of `kinds` that carry the project's tag."""
    found: Dict[str, List[str]] = {}
    for kind in kinds:
        if kind not in KINDS:
            raise ValueError(f"unknown resource kind {kind!r}; known: {', '.join(KINDS)}")
        op, key, name_key, arn_key, extra = KINDS[kind]
        names = []
        for page in ctx.sagemaker.get_paginator(op).paginate(**extra):
            for item in page.get(key, []):
                arn = item[arn_key] if arn_key else _experiment_arn(ctx, item[name_key])
                if _tagged(ctx, arn):
                    names.append(item[name_key])
        found[kind] = names
    return found


def _experiment_arn(ctx: AwsContext, name: str) -> str:
    return ctx.sagemaker.describe_inference_experiment(Name=name)["Arn"]


def _stop_experiment(ctx: AwsContext, name: str, timeout: float = 1800.0, poll: float = 15.0) -> None:
    """Stop an experiment that has not ended (production retained, shadow removed), wait until it
    has ended, then delete it."""
    sm = ctx.sagemaker
    desc = sm.describe_inference_experiment(Name=name)
    if desc["Status"] == "Creating":
        desc = wait_for_experiment(ctx, name, ("Created", "Starting", "Running", *EXPERIMENT_ENDED), timeout, poll)
    if desc["Status"] in ("Running", "Starting", "Created", "Updating"):
        source = next((v["VariantName"] for v in desc.get("ModelVariants", [])
                       if v["VariantName"] == desc.get("ShadowModeConfig", {}).get("SourceModelVariantName")), None)
        actions = {v["VariantName"]: ("Retain" if v["VariantName"] == source else "Remove")
                   for v in desc.get("ModelVariants", [])}
        sm.stop_inference_experiment(Name=name, ModelVariantActions=actions, DesiredState="Cancelled",
                                     Reason="project cleanup")
    if desc["Status"] not in EXPERIMENT_ENDED:
        wait_for_experiment(ctx, name, EXPERIMENT_ENDED, timeout, poll)
    sm.delete_inference_experiment(Name=name)


_DELETE: Dict[str, Callable[[AwsContext, str], None]] = {
    "endpoint": lambda ctx, n: ctx.sagemaker.delete_endpoint(EndpointName=n),
    "endpoint-config": lambda ctx, n: ctx.sagemaker.delete_endpoint_config(EndpointConfigName=n),
    "model": lambda ctx, n: ctx.sagemaker.delete_model(ModelName=n),
    "training-job": lambda ctx, n: ctx.sagemaker.stop_training_job(TrainingJobName=n),
    "mlflow-tracking-server": lambda ctx, n: ctx.sagemaker.delete_mlflow_tracking_server(TrackingServerName=n),
}


def cleanup(ctx: AwsContext, kinds: Iterable[str] = DEFAULT_KINDS, s3: bool = False,
            dry_run: bool = False, wait_timeout: float = 1800.0, poll: float = 15.0) -> Dict[str, List[str]]:
    """Delete (or stop) every tagged resource of `kinds`, in dependency order, and with `s3` the
    objects under the project's prefix. Returns what was (or, with `dry_run`, would be) removed.
    An inference experiment is waited for (`poll` seconds at first, growing; at most
    `wait_timeout` each) until its stop has finished."""
    kinds = [k for k in KINDS if k in set(kinds)]  # dependency order
    found = find_resources(ctx, kinds)
    if s3:
        prefix = ctx.s3_uri()
        found["s3"] = [f"{prefix}/{rel}" for rel in list_objects(ctx.s3, prefix)]
    if dry_run:
        return found
    for kind in kinds:
        for name in found[kind]:
            log.info("removing %s %s", kind, name)
            if kind == "inference-experiment":
                _stop_experiment(ctx, name, wait_timeout, poll)
            else:
                _DELETE[kind](ctx, name)
    if s3 and found["s3"]:
        delete_prefix(ctx.s3, ctx.s3_uri())
    return found


def describe(found: Dict[str, List[str]], dry_run: bool = False) -> Optional[str]:
    verb = "would remove" if dry_run else "removed"
    lines = [f"{verb} {len(names)} {kind}(s){': ' + ', '.join(names[:20]) if names else ''}"
             f"{' ...' if len(names) > 20 else ''}" for kind, names in found.items()]
    return "\n".join(lines)
