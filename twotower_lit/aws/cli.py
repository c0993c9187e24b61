"""How the ``sagemaker_*`` commands fail: one line on stderr saying what failed and what to do.

A failed AWS call otherwise ends in a botocore traceback of a hundred lines whose last one holds
the only useful words. `run` calls a command's ``main`` and turns the errors a user can act on
(AWS refusals, missing credentials, unreachable endpoints, bad options) into that one line and
exit status 1; ``--debug`` anywhere on the command line lets the traceback through instead.
"""
from __future__ import annotations

import sys
from typing import Callable, List, Optional

from botocore.exceptions import (BotoCoreError, ClientError, EndpointConnectionError, NoCredentialsError,
                                 NoRegionError, ParamValidationError)

DEBUG_FLAG = "--debug"

# AWS error code -> what to do about it
_HINTS = {
    "ValidationException": "check the names and options in the message (and --region)",
    "ResourceNotFound": "check the name (and --region)",
    "ResourceInUse": "the name is taken: choose another or remove the old resource",
    "ResourceLimitExceeded": "free resources or ask AWS for a higher quota (Service Quotas console)",
    "ConflictException": "the resource is changing state: wait until it settles and run the command again",
    "ThrottlingException": "AWS is throttling: run the command again in a minute",
    "AccessDeniedException": "the credentials or --role lack a permission: see the message",
    "AccessDenied": "the credentials lack a permission: see the message",
    "UnrecognizedClientException": "the AWS credentials are not valid: check them (--profile, aws configure)",
    "InvalidClientTokenId": "the AWS credentials are not valid: check them (--profile, aws configure)",
    "ExpiredTokenException": "the AWS session has expired: log in again (aws sso login)",
    "ExpiredToken": "the AWS session has expired: log in again (aws sso login)",
    "NoSuchBucket": "check --bucket (or leave it out to use SageMaker's default bucket)",
}


def one_line(text: str) -> str:
    return " ".join(str(text).split())


def describe_error(e: BaseException) -> str:
    """What failed and what to do, in one line."""
    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code", "Unknown")
        hint = _HINTS.get(code, "see the message")
        return f"AWS {e.operation_name} failed ({code}): {one_line(err.get('Message', ''))}; {hint}"
    if isinstance(e, ParamValidationError):
        return f"request refused before it was sent (botocore's service model): {one_line(e)}"
    if isinstance(e, NoCredentialsError):
        return ("no AWS credentials: configure them (aws configure, AWS_PROFILE or --profile), or pass "
                "--endpoint-url to use a moto server")
    if isinstance(e, NoRegionError):
        return "no AWS region: pass --region or set AWS_DEFAULT_REGION"
    if isinstance(e, EndpointConnectionError):
        return f"{one_line(e)}: check --endpoint-url, --region and the network"
    return one_line(e) or type(e).__name__


def run(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None) -> int:
    """Run a command's ``main(argv)``; known failures become one line on stderr and status 1."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = DEBUG_FLAG in argv
    argv = [a for a in argv if a != DEBUG_FLAG]
    try:
        return main(argv)
    except (ClientError, BotoCoreError, ValueError, RuntimeError, TimeoutError, OSError) as e:
        if debug:
            raise
        print(f"error: {describe_error(e)} (run with {DEBUG_FLAG} for the traceback)", file=sys.stderr)
        return 1
