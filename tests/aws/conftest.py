"""AWS test fixtures: an `AwsContext` on the session's moto server whose every request is recorded
and checked against botocore's service model, and stubbed clients for what moto lacks.

`request_log` (session-wide) sees every request made through `recording_session`, whichever
client made it: the project's, the SageMaker SDK's (it builds clients from the boto session it
is given) and botocore Stubbers' (validation happens before the stub answers). Each request is
validated with ``botocore.validate.validate_parameters`` against the operation's input shape,
so a wrong shape fails the test that sent it even where moto would accept or drop it.
`test_zz_request_coverage.py` then checks that every AWS operation the library's code names was
sent at least once by this suite.
"""
from __future__ import annotations

import json
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Tuple

import boto3
import pytest
from botocore.stub import Stubber
from botocore.validate import validate_parameters

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from twotower_lit.aws.config import AwsConfig  # noqa: E402
from twotower_lit.aws.session import AwsContext  # noqa: E402

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/twotower-test"
REGION = "us-east-1"


@dataclass
class RequestLog:
    """(service, operation, params) of every request, each validated against botocore's model."""

    requests: List[Tuple[str, str, Dict]] = field(default_factory=list)

    def record(self, params, model, **_) -> None:
        validate_parameters(params, model.input_shape)  # raises ParamValidationError on a bad shape
        self.requests.append((model.service_model.service_name, model.name, params))

    def calls(self, operation: str) -> List[Dict]:
        """Params of every request of `operation` (CamelCase, e.g. 'CreateEndpointConfig')."""
        return [p for _, op, p in self.requests if op == operation]

    def operations(self) -> set:
        return {(service, op) for service, op, _ in self.requests}


_LOG = RequestLog()


@pytest.fixture(scope="session")
def request_log() -> RequestLog:
    return _LOG


@pytest.fixture
def recording_session() -> boto3.Session:
    """A boto3 session whose clients (any service) validate and record every request."""
    session = boto3.Session(region_name=REGION, aws_access_key_id="testing", aws_secret_access_key="testing")
    session.events.register("before-parameter-build.*.*", _LOG.record)
    return session


@pytest.fixture
def project() -> str:
    """A project tag value of this test alone (cleanup tests must not see other tests' resources)."""
    return f"tt-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def ctx(moto_server, recording_session, project) -> AwsContext:
    """The project's AWS context on the moto server, recording every request."""
    cfg = AwsConfig(endpoint_url=moto_server, region=REGION, role=ROLE, bucket=f"bucket-{project}", project=project)
    c = AwsContext(cfg, session=recording_session)
    c.s3.create_bucket(Bucket=cfg.bucket)
    return c


@pytest.fixture
def stubbed(recording_session, project):
    """``(ctx, stub)``: an AwsContext whose SageMaker client answers from a botocore Stubber (for
    the calls moto does not implement); requests are validated and recorded like all others, and
    every queued response must have been consumed by the end of the test."""
    cfg = AwsConfig(endpoint_url="http://127.0.0.1:9", region=REGION, role=ROLE, bucket=f"bucket-{project}",
                    project=project)
    c = AwsContext(cfg, session=recording_session)
    stub = Stubber(c.sagemaker)
    stub.activate()
    yield c, stub
    stub.assert_no_pending_responses()
    stub.deactivate()


def queue_endpoint_results(moto_url: str, results: List[Dict]) -> None:
    """moto answers invoke_endpoint from this queue (it runs no containers)."""
    import urllib.request

    body = json.dumps({"account_id": ACCOUNT, "region": REGION, "results": results}).encode()
    req = urllib.request.Request(f"{moto_url}/moto-api/static/sagemaker/endpoint-results", data=body,
                                 headers={"Content-Type": "application/json"}, method="POST")
    urllib.request.urlopen(req, timeout=10).read()


def have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def pytest_collection_modifyitems(session, config, items):
    """Run the request-coverage check last, after every request of the suite was recorded."""
    last = [i for i in items
            if i.nodeid.endswith("test_zz_request_coverage.py::test_every_library_request_was_sent_and_validated")]
    items[:] = [i for i in items if i not in last] + last


@pytest.fixture(scope="session")
def aws_suite_complete(request) -> bool:
    """True when every test of tests/aws was selected in this session (not a -k/file subset)."""
    selected = {i.nodeid for i in request.session.items if "tests/aws/" in i.nodeid.replace(os.sep, "/")}
    here = Path(__file__).parent
    files = {p.name for p in here.glob("test_*.py")}
    seen = {nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in selected}
    deselected = getattr(request.config, "_aws_deselected", False)
    return files <= seen and not deselected


def pytest_deselected(items):
    for item in items:
        if "tests/aws/" in item.nodeid.replace(os.sep, "/"):
            item.config._aws_deselected = True
