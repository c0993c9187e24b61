"""Every AWS operation the library's code names was sent at least once by this suite, through a
client whose requests are validated against botocore's service model (conftest.RequestLog).

Runs last (conftest orders it) and only when the whole tests/aws suite ran in this session.
Calls the SageMaker SDKs make on the project's behalf (CreateTrainingJob) are checked in
test_training_job_sdk.py, in the SDK environments."""
import re
from pathlib import Path

import botocore.session
import pytest
from botocore import xform_name

LIBRARY = Path(__file__).resolve().parents[2] / "twotower_lit" / "aws"
SERVICES = ("sagemaker", "sagemaker-runtime", "s3", "cloudwatch", "sts")


def operations_named_in_the_library() -> dict:
    """``{(service, OperationName)}`` for every botocore operation name written in twotower_lit/aws:
    a method call ``.create_endpoint(`` or a name in a string (paginators, tables)."""
    source = "\n".join(p.read_text() for p in sorted(LIBRARY.glob("*.py")))
    session = botocore.session.get_session()
    found = {}
    for service in SERVICES:
        model = session.get_service_model(service)
        for op in model.operation_names:
            name = xform_name(op)
            if re.search(rf"(\.{name}\(|[\"']{name}[\"'])", source):
                found.setdefault(name, set()).add((service, op))
    return found


def test_every_library_request_was_sent_and_validated(request_log, aws_suite_complete):
    if not aws_suite_complete:
        pytest.skip("only meaningful when the whole tests/aws suite ran in this session")
    named = operations_named_in_the_library()
    assert len(named) >= 30, sorted(named)  # the scan itself works
    sent = request_log.operations()
    missing = sorted(name for name, candidates in named.items() if not candidates & sent)
    assert not missing, f"operations named in twotower_lit/aws but never sent (so never shape-checked): {missing}"
