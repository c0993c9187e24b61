"""MLflow tracking URI kinds and the SageMaker managed tracking server helper (not in moto: Stubber)."""
import importlib.util
import sys

import pytest

from twotower_lit.aws import container
from twotower_lit.aws import mlflow as aws_mlflow

ARN = "arn:aws:sagemaker:eu-west-1:123456789012:mlflow-tracking-server/twotower"


@pytest.mark.parametrize("uri,kind", [(None, "sqlite"), ("sqlite:///x/mlflow.db", "sqlite"), (ARN, "sagemaker"),
                                      ("http://127.0.0.1:5000", "server"), ("none", "off"),
                                      ("databricks", "other")])
def test_uri_kinds(uri, kind):
    assert aws_mlflow.tracking_uri_kind(uri) == kind


def test_a_foreign_arn_is_refused_and_a_missing_plugin_is_named(monkeypatch, tmp_path):
    """Both plugin states in every environment: the plugin is hidden from the import system (a None
    in sys.modules is how Python marks a module as not importable), then an importable
    sagemaker_mlflow package is put on the path."""
    with pytest.raises(ValueError, match="mlflow-tracking-server"):
        aws_mlflow.tracking_uri_kind("arn:aws:s3:::bucket")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "sagemaker_mlflow", None)
        with pytest.raises(RuntimeError, match=r"is a SageMaker tracking server: pip install sagemaker-mlflow "
                                               r"\(requirements/aws.txt\)"):
            aws_mlflow.require_plugin(ARN)
        for uri in ("http://127.0.0.1:5000", None, "sqlite:///x/mlflow.db"):  # no plugin needed for these
            assert aws_mlflow.require_plugin(uri) is None
    if importlib.util.find_spec("sagemaker_mlflow") is None:
        (tmp_path / "sagemaker_mlflow").mkdir()
        (tmp_path / "sagemaker_mlflow" / "__init__.py").write_text("")
        monkeypatch.syspath_prepend(str(tmp_path))
    assert importlib.util.find_spec("sagemaker_mlflow") is not None
    assert aws_mlflow.require_plugin(ARN) is None


def server(status):
    return {"TrackingServerArn": ARN, "TrackingServerName": "twotower", "TrackingServerStatus": status}


def test_creates_a_missing_server_and_waits_until_it_is_ready(stubbed, request_log):
    ctx, stub = stubbed
    stub.add_client_error("describe_mlflow_tracking_server", service_error_code="ResourceNotFound",
                          expected_params={"TrackingServerName": "twotower"})
    stub.add_response("create_mlflow_tracking_server", {"TrackingServerArn": ARN})
    stub.add_response("describe_mlflow_tracking_server", server("Creating"), {"TrackingServerName": "twotower"})
    stub.add_response("describe_mlflow_tracking_server", server("Created"), {"TrackingServerName": "twotower"})
    assert aws_mlflow.find_or_create_tracking_server(ctx, "twotower", poll=0.0) == ARN
    create = request_log.calls("CreateMlflowTrackingServer")[-1]
    assert create["ArtifactStoreUri"] == ctx.s3_uri("mlflow") and create["RoleArn"] == ctx.role
    assert {"Key": "project", "Value": ctx.cfg.project} in create["Tags"]
    # a server version that serves the MLflow 3 client of requirements/base.txt
    assert create["MlflowVersion"] == aws_mlflow.MLFLOW_SERVER_VERSION
    from importlib import metadata

    client_major = metadata.version("mlflow").split(".")[0]
    base_pin = container.read_pins(container.BASE_REQUIREMENTS)["mlflow"]
    assert client_major == create["MlflowVersion"].split(".")[0] == base_pin.split("==")[1].split(".")[0]


@pytest.mark.parametrize("version,message", [("2.16", "needs a 3.x tracking server"),
                                             ("latest", "expected a version like")])
def test_a_server_version_the_client_cannot_use_is_refused_before_sending(stubbed, version, message):
    ctx, _ = stubbed  # no queued answer: any request would fail the test
    with pytest.raises(ValueError, match=message):
        aws_mlflow.find_or_create_tracking_server(ctx, "twotower", mlflow_version=version)


def test_starts_a_stopped_server(stubbed):
    ctx, stub = stubbed
    stub.add_response("describe_mlflow_tracking_server", server("Stopped"), {"TrackingServerName": "twotower"})
    stub.add_response("start_mlflow_tracking_server", {"TrackingServerArn": ARN}, {"TrackingServerName": "twotower"})
    stub.add_response("describe_mlflow_tracking_server", server("Starting"), {"TrackingServerName": "twotower"})
    stub.add_response("describe_mlflow_tracking_server", server("Started"), {"TrackingServerName": "twotower"})
    assert aws_mlflow.find_or_create_tracking_server(ctx, "twotower", poll=0.0) == ARN


def test_a_failed_server_is_reported(stubbed):
    ctx, stub = stubbed
    stub.add_response("describe_mlflow_tracking_server", server("CreateFailed"))
    with pytest.raises(RuntimeError, match="CreateFailed"):
        aws_mlflow.find_or_create_tracking_server(ctx, "twotower", poll=0.0)
