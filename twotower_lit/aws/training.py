"""The SageMaker training job: `entrypoints/train.py` under torchrun on N instances.

`plan_training_job` turns a `TrainConfig` (the same one the local CLI builds) and a
`SageMakerTrainConfig` into a `TrainingJobPlan`: data uploaded and its channel, the staged source
dir with its requirements.txt, the image, the hyperparameters (`hyperparameters.to_hyperparameters`,
the only mapping), checkpoints, spot, tags. `start_training_job` hands the plan to whichever
SageMaker Python SDK is installed:

* v2 (2.257.x): ``sagemaker.pytorch.PyTorch(..., distribution={"torch_distributed": ...})``,
  as the workshop does. The default where it is installed. Its torch_distributed option has no
  processes-per-host setting: the training toolkit in the image starts torchrun with
  ``--nproc_per_node`` from the ``sagemaker_mpi_num_of_processes_per_host`` hyperparameter (one
  per GPU without it), so that is what carries ``processes_per_host``.
* v3 (3.x): ``sagemaker.train.ModelTrainer(..., distributed=Torchrun(process_count_per_node))``.
  It names the job itself (``<base_job_name>-<timestamp>``, decided inside ``train()``), so with
  automatic checkpoints it is left to place them under that name too.

Both use one job name for the job and its checkpoint prefix. The two SDKs cannot share one
environment; both are imported only here, inside the function that uses them, so the rest of the
project never needs either; `resolve_sdk` says which environment to use when none is installed.
"""
from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Dict, Iterator, List, Optional

from twotower_lit.aws import container
from twotower_lit.aws.config import MAX_TRAINING_RUNTIME, SageMakerTrainConfig
from twotower_lit.aws.environment import CHECKPOINT_LOCAL_PATH, DATA_CHANNEL
from twotower_lit.aws.hyperparameters import CONTAINER_FIELDS, metric_definitions, to_hyperparameters
from twotower_lit.aws.mlflow import is_managed_mlflow_arn
from twotower_lit.aws.s3 import upload_directory
from twotower_lit.aws.session import AwsContext, resource_name
from twotower_lit.config import TrainConfig
from twotower_lit.options import replace_options, to_flat_dict

log = logging.getLogger(__name__)


@dataclass
class TrainingJobPlan:
    """One training job, decided once and launched by either SDK."""

    sdk: str  # 'v2' or 'v3': what launches it
    job_name: Optional[str]  # SDK v2 uses it as is; v3 names the job <base_job_name>-<timestamp> itself
    base_job_name: str
    image_uri: str
    image_torch: str
    role: str
    instance_type: str
    instance_count: int
    processes_per_host: Optional[int]
    source_dir: str
    entry_point: str
    hyperparameters: Dict[str, str]
    channels: Dict[str, str]
    environment: Dict[str, str]
    output_path: str
    code_location: str
    checkpoints: bool  # SageMaker syncs /opt/ml/checkpoints with S3
    checkpoint_s3_uri: Optional[str]  # None with checkpoints: v3 puts them under the job's own name
    spot: bool
    max_run: int
    max_wait: Optional[int]
    volume_size: int
    tags: List[Dict[str, str]]
    metric_definitions: List[Dict[str, str]]
    not_sent: Dict[str, object] = field(default_factory=dict)

    def summary(self) -> Dict:
        """What the job will be (for printing before it starts)."""
        out = asdict(self)
        out["source_files"] = len(container.source_files(self.source_dir))
        return out


# SDK major -> the environment scripts/setup.sh builds for it
SDK_ENVIRONMENTS = {"v2": ".venv-sagemaker-v2", "v3": ".venv-sagemaker-v3"}
PROCESSES_PER_HOST_HYPERPARAMETER = "sagemaker_mpi_num_of_processes_per_host"


def installed_sdk() -> Optional[str]:
    """'v2' or 'v3' for the SageMaker Python SDK in this environment, or None."""
    if importlib.util.find_spec("sagemaker") is None:
        return None
    if _has_module("sagemaker.pytorch"):
        return "v2"
    if _has_module("sagemaker.train"):
        return "v3"
    return None


def _has_module(name: str) -> bool:
    # once loaded, SDK v3 answers a lookup of a module it removed (sagemaker.pytorch) with an error
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def resolve_sdk(requested: str) -> str:
    """The SDK that will launch the job; refuses (before anything is uploaded or created) when it
    is not installed here, naming the environment that has it."""
    have = installed_sdk()
    want = "v2" if requested == "auto" else requested
    if have is None or (requested != "auto" and have != requested):
        env = SDK_ENVIRONMENTS[want]
        raise RuntimeError(
            f"{'no SageMaker Python SDK' if have is None else f'SageMaker SDK {have}, not {want},'} in this "
            f"environment ({sys.executable}): run the launcher with {env}/bin/python (built by "
            f"scripts/setup.sh), or pip install -r requirements/"
            f"{'aws.txt' if want == 'v2' else 'sdk-v3.txt'} into an environment of its own "
            f"(the two SDKs cannot share one)")
    return have


def check_limits(job: SageMakerTrainConfig) -> None:
    """SageMaker's limits on the job, checked before anything is sent."""
    if not 1 <= job.max_run <= MAX_TRAINING_RUNTIME:
        raise ValueError(f"--max-run {job.max_run}: SageMaker allows 1 to {MAX_TRAINING_RUNTIME} seconds (28 days)")
    if job.spot and job.max_wait is not None and job.max_wait < job.max_run:
        raise ValueError(f"--max-wait {job.max_wait} is shorter than --max-run {job.max_run}: with spot, the wait "
                         f"includes the run")
    if job.processes_per_host is not None and job.processes_per_host < 1:
        raise ValueError(f"--processes-per-host {job.processes_per_host}: must be at least 1")


def plan_training_job(ctx: AwsContext, cfg: TrainConfig, job: SageMakerTrainConfig, workdir: str,
                      upload: bool = True, sdk: Optional[str] = None) -> TrainingJobPlan:
    """Upload the data if it is local (unless `upload` is false: a dry run), stage the source dir
    under `workdir`, and decide the job for `sdk` ('v2' or 'v3'; default: the installed one, or
    ``job.sdk``, or v2)."""
    check_limits(job)
    sdk = sdk or (job.sdk if job.sdk != "auto" else installed_sdk() or "v2")
    base_job_name = job.job_name or resource_name(ctx.cfg.project)
    # one name for the job and its checkpoints: ours on v2; on v3 the SDK's (it always adds a timestamp)
    job_name = (job.job_name or resource_name(ctx.cfg.project, "@time")) if sdk == "v2" else None
    checkpoint_uri = job.checkpoint_s3_uri or ("auto" if job.spot else None)
    checkpoints = bool(checkpoint_uri)
    if checkpoint_uri == "auto":
        checkpoint_uri = ctx.s3_uri("checkpoints", job_name) if job_name else None
    if checkpoints and not cfg.output.resume:
        cfg = replace_options(cfg, resume="auto")  # a restarted (spot) job continues from the synced checkpoints
    image, image_torch = container.training_image(ctx.region, job.instance_type, job.image_uri, job.image_torch)
    requirements = container.training_requirements(job.instance_type, image_torch,
                                                   mlflow_plugin=is_managed_mlflow_arn(cfg.tracking.mlflow_uri),
                                                   image_has_torchrec=job.image_has_torchrec)
    channels = {}
    if cfg.data.data_dir:
        channels[DATA_CHANNEL] = _data_uri(ctx, cfg.data.data_dir, job.data_s3_uri, upload)
    defaults = to_flat_dict(TrainConfig())
    not_sent = {k: v for k, v in to_flat_dict(cfg).items() if k in CONTAINER_FIELDS and v != defaults[k]}
    source = container.stage_source_dir(os.path.join(workdir, "source"), requirements)
    return TrainingJobPlan(
        sdk=sdk, job_name=job_name, base_job_name=base_job_name, image_uri=image, image_torch=image_torch,
        role=ctx.role, instance_type=job.instance_type, instance_count=job.instance_count,
        processes_per_host=job.processes_per_host, source_dir=source.path, entry_point=source.entry_point,
        hyperparameters=to_hyperparameters(cfg), channels=channels, environment={"PYTHONUNBUFFERED": "1"},
        output_path=job.output_path or ctx.s3_uri("training"), code_location=ctx.s3_uri("code"),
        checkpoints=checkpoints, checkpoint_s3_uri=checkpoint_uri, spot=job.spot, max_run=job.max_run,
        max_wait=(job.max_wait or 2 * job.max_run) if job.spot else None, volume_size=job.volume_size,
        tags=ctx.tags(), metric_definitions=metric_definitions(cfg.tracking.eval_k), not_sent=not_sent)


def _data_uri(ctx: AwsContext, data_dir: str, target: Optional[str], upload: bool) -> str:
    if data_dir.startswith("s3://"):
        return data_dir.rstrip("/")
    local = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(local):
        raise FileNotFoundError(f"--data-dir {data_dir}: no such directory")
    uri = (target or ctx.s3_uri("data", os.path.basename(local.rstrip(os.sep)))).rstrip("/")
    if upload:
        upload_directory(ctx.s3, local, uri)
    return uri


@contextlib.contextmanager
def _sdk_environment(ctx: AwsContext) -> Iterator[None]:
    """The SDKs create some clients themselves, from the environment: give them the context's
    region (SDK v3's job waiter needs one) and, with an endpoint override (moto), send them there
    too (AWS_ENDPOINT_URL), skip v3's IAM role check and switch telemetry off (it calls out to AWS)."""
    names = ("AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL", "SAGEMAKER_USER_CONFIG_OVERRIDE", "SAGEMAKER_VALIDATE_ROLE",
             "SAGEMAKER_SUPPRESS_V2_WARNING")
    saved = {k: os.environ.get(k) for k in names}
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["AWS_DEFAULT_REGION"] = ctx.region
        if ctx.offline:
            config = os.path.join(tmp, "sagemaker-config.yaml")
            with open(config, "w") as f:
                f.write("SchemaVersion: '1.0'\nSageMaker:\n  PythonSDK:\n    Modules:\n      TelemetryOptOut: true\n")
            os.environ.update(AWS_ENDPOINT_URL=ctx.endpoint_url, SAGEMAKER_USER_CONFIG_OVERRIDE=config,
                              SAGEMAKER_VALIDATE_ROLE="false", SAGEMAKER_SUPPRESS_V2_WARNING="1")
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def start_training_job(ctx: AwsContext, plan: TrainingJobPlan, sdk: str = "auto", wait: bool = True,
                       logs: bool = True) -> str:
    """Create the job through SDK `sdk` ('auto', 'v2', 'v3'); returns the job's name."""
    sdk = resolve_sdk(sdk)
    if sdk != plan.sdk:
        raise ValueError(f"the job was planned for SDK {plan.sdk}, but SDK {sdk} would launch it")
    with _sdk_environment(ctx):
        if sdk == "v2":
            return _start_v2(ctx, plan, wait, logs)
        return _start_v3(ctx, plan, wait, logs)


def _start_v2(ctx: AwsContext, plan: TrainingJobPlan, wait: bool, logs: bool) -> str:
    estimator, inputs = v2_estimator(ctx, plan)
    estimator.fit(inputs, job_name=plan.job_name, wait=wait, logs="All" if (wait and logs) else "None")
    return estimator.latest_training_job.name


def v2_estimator(ctx: AwsContext, plan: TrainingJobPlan):
    """SDK v2's ``PyTorch`` estimator for `plan` and its inputs (``fit``'s first argument): what the
    training job launches, and what Automatic Model Tuning (`twotower_lit.aws.tuning`) tunes."""
    import sagemaker
    from sagemaker.inputs import TrainingInput
    from sagemaker.pytorch import PyTorch

    session = sagemaker.Session(boto_session=ctx.session, sagemaker_client=ctx.sagemaker,
                                sagemaker_runtime_client=ctx.client("sagemaker-runtime"), default_bucket=ctx.bucket)
    hyperparameters: Dict[str, object] = dict(plan.hyperparameters)
    if plan.processes_per_host:
        hyperparameters[PROCESSES_PER_HOST_HYPERPARAMETER] = plan.processes_per_host
    estimator = PyTorch(
        entry_point=plan.entry_point, source_dir=plan.source_dir, image_uri=plan.image_uri, role=plan.role,
        instance_type=plan.instance_type, instance_count=plan.instance_count,
        distribution={"torch_distributed": {"enabled": True}}, hyperparameters=hyperparameters,
        environment=dict(plan.environment), output_path=plan.output_path, code_location=plan.code_location,
        checkpoint_s3_uri=plan.checkpoint_s3_uri,
        checkpoint_local_path=CHECKPOINT_LOCAL_PATH if plan.checkpoint_s3_uri else None,
        use_spot_instances=plan.spot, max_run=plan.max_run, max_wait=plan.max_wait, volume_size=plan.volume_size,
        tags=plan.tags, metric_definitions=plan.metric_definitions, disable_profiler=True,
        debugger_hook_config=False, sagemaker_session=session)
    inputs = {name: TrainingInput(uri, distribution="FullyReplicated") for name, uri in plan.channels.items()}
    return estimator, inputs or None


def _start_v3(ctx: AwsContext, plan: TrainingJobPlan, wait: bool, logs: bool) -> str:
    from sagemaker.core.helper.session_helper import Session
    from sagemaker.train import ModelTrainer
    from sagemaker.train.configs import (CheckpointConfig, Compute, InputData, MetricDefinition, OutputDataConfig,
                                         SourceCode, StoppingCondition, Tag)
    from sagemaker.train.distributed import Torchrun

    session = Session(boto_session=ctx.session, sagemaker_client=ctx.sagemaker,
                      sagemaker_runtime_client=ctx.client("sagemaker-runtime"), default_bucket=ctx.bucket,
                      default_bucket_prefix=ctx.cfg.prefix)
    trainer = ModelTrainer(
        training_image=plan.image_uri, role=plan.role, sagemaker_session=session, base_job_name=plan.base_job_name,
        source_code=SourceCode(source_dir=plan.source_dir, entry_script=plan.entry_point,
                               requirements=container.SourceDir(plan.source_dir).requirements),
        compute=Compute(instance_type=plan.instance_type, instance_count=plan.instance_count,
                        volume_size_in_gb=plan.volume_size, enable_managed_spot_training=plan.spot or None),
        distributed=Torchrun(process_count_per_node=plan.processes_per_host),
        stopping_condition=StoppingCondition(max_runtime_in_seconds=plan.max_run,
                                             max_wait_time_in_seconds=plan.max_wait),
        output_data_config=OutputDataConfig(s3_output_path=plan.output_path),
        checkpoint_config=(CheckpointConfig(s3_uri=plan.checkpoint_s3_uri, local_path=CHECKPOINT_LOCAL_PATH)
                           if plan.checkpoints else None),
        hyperparameters=dict(plan.hyperparameters), environment=dict(plan.environment),
        tags=[Tag(key=t["Key"], value=t["Value"]) for t in plan.tags])
    trainer = trainer.with_metric_definitions([MetricDefinition(name=m["Name"], regex=m["Regex"])
                                               for m in plan.metric_definitions])
    trainer.train(input_data_config=[InputData(channel_name=name, data_source=uri)
                                     for name, uri in plan.channels.items()] or None, wait=wait, logs=logs)
    # v3 names the job <base_job_name>-<timestamp>; the created job is only on this attribute
    return trainer._latest_training_job.training_job_name


def describe_training_job(ctx: AwsContext, job_name: str) -> Dict:
    """Status, timings, metrics and artifacts of a training job."""
    d = ctx.sagemaker.describe_training_job(TrainingJobName=job_name)
    keys = ("TrainingJobName", "TrainingJobStatus", "SecondaryStatus", "FailureReason", "ModelArtifacts",
            "FinalMetricDataList", "TrainingTimeInSeconds", "BillableTimeInSeconds", "CheckpointConfig",
            "HyperParameters", "EnableManagedSpotTraining")
    return {k: d[k] for k in keys if k in d}


def model_artifacts(ctx: AwsContext, job_name: str) -> str:
    """The S3 URI of a completed job's model.tar.gz."""
    d = ctx.sagemaker.describe_training_job(TrainingJobName=job_name)
    if d["TrainingJobStatus"] != "Completed":
        raise RuntimeError(f"training job {job_name} is {d['TrainingJobStatus']}"
                           f"{': ' + d['FailureReason'] if d.get('FailureReason') else ''}; no model to use")
    return d["ModelArtifacts"]["S3ModelArtifacts"]
