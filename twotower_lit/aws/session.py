"""One AWS context per run: the boto3 session and clients, the account's bucket and role, the tags.

Every AWS call of the project goes through a client from `AwsContext.client`, so pointing the
context at a moto server (``AwsConfig.endpoint_url``) moves all of them, and an event handler
registered on ``AwsContext.session`` (the tests' request recorder) sees every request.
`check_request` validates a request against botocore's own service model without sending it
(what the dry runs print, and what the tests use for calls moto does not implement).
"""
from __future__ import annotations

import logging
import os
import re
import time
from functools import cached_property
from typing import Any, Dict, List, Mapping, Optional

import boto3
import botocore.session
from botocore.config import Config
from botocore.exceptions import ClientError
from botocore.validate import validate_parameters

from twotower_lit.aws.config import AwsConfig

log = logging.getLogger(__name__)

PROJECT_TAG = "project"
ROLE_ENV = "SAGEMAKER_ROLE_ARN"
_NAME_OK = re.compile(r"^[a-zA-Z0-9](-*[a-zA-Z0-9])*$")


def parse_key_values(spec: Optional[str]) -> Dict[str, str]:
    """``'a=1,b=2'`` -> ``{"a": "1", "b": "2"}`` (tags, container environment)."""
    out: Dict[str, str] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{part!r}: expected key=value")
        out[key.strip()] = value.strip()
    return out


def resource_name(*parts: str, max_len: int = 63) -> str:
    """A SageMaker resource name from parts: letters, digits and hyphens, at most `max_len`
    characters (63 for most resources), ending in a UTC timestamp when the parts end with ``"@time"``."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    words = [stamp if p == "@time" else p for p in parts if p]
    name = re.sub(r"[^a-zA-Z0-9-]+", "-", "-".join(words)).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if len(name) > max_len:  # keep the distinguishing tail (the timestamp)
        name = (name[: max_len - len(stamp) - 1].rstrip("-") + "-" + stamp) if parts[-1] == "@time" else name[:max_len]
    if not _NAME_OK.match(name) or len(name) > max_len:
        raise ValueError(f"cannot make a SageMaker name from {parts}")
    return name


def parse_s3_uri(uri: str) -> tuple:
    """``s3://bucket/key/prefix`` -> ``("bucket", "key/prefix")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri}: expected s3://bucket/key")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise ValueError(f"{uri}: no bucket")
    return bucket, key


def check_request(service: str, operation: str, params: Mapping[str, Any]) -> None:
    """Raise botocore's ParamValidationError if `params` do not fit `operation`'s input shape in
    botocore's service model (the same check a client makes before sending)."""
    model = _service_model(service)
    validate_parameters(dict(params), model.operation_model(operation).input_shape)


_MODELS: Dict[str, Any] = {}


def _service_model(service: str):
    if service not in _MODELS:
        _MODELS[service] = botocore.session.get_session().get_service_model(service)
    return _MODELS[service]


class AwsContext:
    """Session, clients, account, bucket, role and tags for one configuration."""

    def __init__(self, cfg: Optional[AwsConfig] = None, session: Optional[boto3.Session] = None) -> None:
        self.cfg = cfg or AwsConfig()
        self.endpoint_url = self.cfg.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        if session is None:
            session = boto3.Session(profile_name=self.cfg.profile, region_name=self.cfg.region)
            if session.region_name is None:  # the SageMaker SDKs refuse a session without a region
                session = boto3.Session(profile_name=self.cfg.profile, region_name="us-east-1")
        self.session = session
        self.region = self.cfg.region or session.region_name or "us-east-1"
        self._clients: Dict[str, Any] = {}

    @property
    def offline(self) -> bool:
        """True when calls go to a local endpoint (moto) rather than AWS."""
        return bool(self.endpoint_url)

    def client(self, service: str):
        """A cached boto3 client; adaptive retries, botocore's parameter validation always on."""
        if service not in self._clients:
            self._clients[service] = self.session.client(
                service, region_name=self.region, endpoint_url=self.endpoint_url,
                config=Config(retries={"mode": "adaptive", "max_attempts": 8}, parameter_validation=True,
                              user_agent_extra="twotower-lit"))
        return self._clients[service]

    @property
    def sagemaker(self):
        return self.client("sagemaker")

    @property
    def s3(self):
        return self.client("s3")

    @cached_property
    def account(self) -> str:
        return self.client("sts").get_caller_identity()["Account"]

    @cached_property
    def bucket(self) -> str:
        """The configured bucket (used as it is), or SageMaker's default bucket
        ``sagemaker-<region>-<account>``, created when it does not exist yet."""
        if self.cfg.bucket:
            return self.cfg.bucket
        name = f"sagemaker-{self.region}-{self.account}"
        try:
            self.s3.head_bucket(Bucket=name)
        except ClientError as e:
            if e.response["Error"]["Code"] not in ("404", "NoSuchBucket", "NotFound"):
                raise
            params: Dict[str, Any] = {"Bucket": name}
            if self.region != "us-east-1":
                params["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
            self.s3.create_bucket(**params)
            log.info("created bucket s3://%s", name)
        return name

    @cached_property
    def role(self) -> str:
        role = self.cfg.role or os.environ.get(ROLE_ENV)
        if not role:
            raise ValueError(f"no SageMaker execution role: pass --role arn:aws:iam::<account>:role/<name> "
                             f"or set {ROLE_ENV}")
        return role

    def s3_uri(self, *parts: str) -> str:
        """``s3://<bucket>/<prefix>/<parts...>``."""
        key = "/".join(p.strip("/") for p in (self.cfg.prefix, *parts) if p and p.strip("/"))
        return f"s3://{self.bucket}/{key}"

    def tags(self, **extra: str) -> List[Dict[str, str]]:
        """The project tag, the configured extra tags and `extra`, as AWS's ``[{"Key", "Value"}]``."""
        tags = {PROJECT_TAG: self.cfg.project, **parse_key_values(self.cfg.tags), **extra}
        return [{"Key": k, "Value": str(v)} for k, v in tags.items()]
