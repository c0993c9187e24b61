"""MLflow on AWS: which kind of tracking URI a config holds, and SageMaker's managed tracking server.

`TrainConfig.tracking.mlflow_uri` may be empty (embedded SQLite in the run directory, see
`twotower_lit.tracking`), an MLflow server URL, or the ARN of a SageMaker managed MLflow tracking
server. MLflow understands the ARN through the ``sagemaker-mlflow`` plugin (an optional extra,
``requirements/aws.txt``; the training job installs it when its URI is an ARN). The launcher
passes the ARN to the job as the ``mlflow_uri`` hyperparameter, like any other option.
"""
from __future__ import annotations

import importlib.util
import logging
import re
import time
from typing import Optional

from twotower_lit.aws.session import AwsContext

log = logging.getLogger(__name__)

# The MLflow version of a tracking server created here: the newest MLflow 3 release SageMaker's
# managed servers offer (its documented versions: 2.13, 2.16, 3.0). The client is MLflow 3
# (requirements/base.txt); left unset, SageMaker picks its default, which may be a 2.x server.
MLFLOW_SERVER_VERSION = "3.0"
_ARN = re.compile(r"^arn:aws[a-z-]*:sagemaker:[a-z0-9-]+:\d{12}:(mlflow-tracking-server|mlflow-app)/[\w-]+$")
_READY = ("Created", "Started", "Updated", "MaintenanceComplete")
_FAILED = ("CreateFailed", "UpdateFailed", "StartFailed", "DeleteFailed", "StopFailed", "MaintenanceFailed")


def is_managed_mlflow_arn(uri: Optional[str]) -> bool:
    return bool(uri) and bool(_ARN.match(uri))


def tracking_uri_kind(uri: Optional[str]) -> str:
    """'sqlite' (embedded, the default), 'sagemaker' (managed server ARN), 'server' (http[s]://),
    'off' ('none': no tracking, see `twotower_lit.tracking`) or 'other' (e.g. databricks)."""
    if uri and uri.lower() == "none":
        return "off"
    if not uri or uri.startswith("sqlite:"):
        return "sqlite"
    if is_managed_mlflow_arn(uri):
        return "sagemaker"
    if uri.startswith(("http://", "https://")):
        return "server"
    if uri.startswith("arn:"):
        raise ValueError(f"{uri}: an ARN, but not a SageMaker MLflow tracking server's "
                         "(arn:aws:sagemaker:<region>:<account>:mlflow-tracking-server/<name>)")
    return "other"


def require_plugin(uri: Optional[str]) -> None:
    """Fail early, saying what to install, when `uri` is an ARN and the plugin is missing."""
    if tracking_uri_kind(uri) == "sagemaker" and importlib.util.find_spec("sagemaker_mlflow") is None:
        raise RuntimeError(f"MLflow tracking URI {uri} is a SageMaker tracking server: pip install "
                           "sagemaker-mlflow (requirements/aws.txt) so MLflow can reach it")


def check_server_version(version: str) -> None:
    """A tracking server's MLflow version must serve this project's MLflow 3 client."""
    if not re.fullmatch(r"\d+\.\d+(\.\d+)?", version or ""):
        raise ValueError(f"--mlflow-version {version!r}: expected a version like {MLFLOW_SERVER_VERSION}")
    if int(version.split(".")[0]) < 3:
        raise ValueError(f"--mlflow-version {version}: the project's MLflow client is 3.x, which needs a 3.x "
                         f"tracking server (e.g. {MLFLOW_SERVER_VERSION})")


def find_or_create_tracking_server(ctx: AwsContext, name: str, artifact_store_uri: Optional[str] = None,
                                   size: str = "Small", wait: bool = True, timeout: float = 3600.0,
                                   poll: float = 30.0, mlflow_version: str = MLFLOW_SERVER_VERSION) -> str:
    """The ARN of the managed MLflow tracking server `name`: started if stopped, created (MLflow
    `mlflow_version`, with the project tag, artifacts under s3://BUCKET/PREFIX/mlflow) if missing;
    waits until it is ready."""
    check_server_version(mlflow_version)
    sm = ctx.sagemaker
    try:
        desc = sm.describe_mlflow_tracking_server(TrackingServerName=name)
    except sm.exceptions.ResourceNotFound:
        log.info("creating SageMaker MLflow tracking server %s (takes ~20 min)", name)
        sm.create_mlflow_tracking_server(
            TrackingServerName=name, ArtifactStoreUri=artifact_store_uri or ctx.s3_uri("mlflow"),
            TrackingServerSize=size, MlflowVersion=mlflow_version, RoleArn=ctx.role,
            AutomaticModelRegistration=False, Tags=ctx.tags())
        desc = sm.describe_mlflow_tracking_server(TrackingServerName=name)
    else:
        if not desc.get("MlflowVersion", "3").startswith("3"):
            log.warning("MLflow tracking server %s runs MLflow %s; the project's MLflow 3 client may not work "
                        "with it", name, desc["MlflowVersion"])
    if desc["TrackingServerStatus"] in ("Stopped", "Stopping"):
        if desc["TrackingServerStatus"] == "Stopped":
            sm.start_mlflow_tracking_server(TrackingServerName=name)
        desc = sm.describe_mlflow_tracking_server(TrackingServerName=name)
    deadline = time.monotonic() + timeout
    while wait and desc["TrackingServerStatus"] not in _READY:
        if desc["TrackingServerStatus"] in _FAILED:
            raise RuntimeError(f"MLflow tracking server {name} is {desc['TrackingServerStatus']}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"MLflow tracking server {name} still {desc['TrackingServerStatus']} "
                               f"after {timeout:.0f} s")
        time.sleep(poll)
        desc = sm.describe_mlflow_tracking_server(TrackingServerName=name)
    return desc["TrackingServerArn"]
