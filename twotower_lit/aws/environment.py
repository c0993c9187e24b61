"""Inside a SageMaker training job: SageMaker's environment -> `TrainConfig` and output paths.

SageMaker (and the toolkits of both SDKs) set::

    SM_MODEL_DIR=/opt/ml/model             uploaded as model.tar.gz when the job ends
    SM_OUTPUT_DATA_DIR=/opt/ml/output/data uploaded as output.tar.gz
    SM_CHANNEL_<NAME>=/opt/ml/input/data/<name>   one per input channel
    SM_HPS='{"max_epochs": 2, ...}'        the hyperparameters (also passed as --name value)
    SM_HOSTS='["algo-1","algo-2"]'  SM_CURRENT_HOST=algo-1  SM_NUM_GPUS=8
    SM_TRAINING_ENV='{"job_name": ..., ...}'

and torchrun adds RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE. `apply_sagemaker_environment`
fills the options the launcher left to the container (`hyperparameters.CONTAINER_FIELDS`):
data from the ``data`` channel (or the only one), outputs (metrics, MLflow's SQLite store,
curves) to SM_OUTPUT_DATA_DIR, checkpoints to /opt/ml/checkpoints (what SageMaker syncs with the
job's checkpoint S3 URI), processes per node and nodes from torchrun or SM_HOSTS.
`publish_model` puts the exported model into SM_MODEL_DIR in the deployable model.tar.gz layout
(model files at the top, ``code/``), so the job's model.tar.gz goes straight to an endpoint.
Outside SageMaker both are no-ops.
"""
from __future__ import annotations

import json
import os
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Sequence

from twotower_lit.config import TrainConfig
from twotower_lit.options import replace_options

DATA_CHANNEL = "data"
SDK_CHANNELS = frozenset({"code", "sm_drivers"})  # SDK v3 ships the source and its drivers as channels
CHECKPOINT_LOCAL_PATH = "/opt/ml/checkpoints"  # the launcher's checkpoint_local_path


@dataclass
class SageMakerEnvironment:
    """What a SageMaker training container tells the entry script about itself."""

    model_dir: str
    output_data_dir: str
    channels: Dict[str, str] = field(default_factory=dict)
    hyperparameters: Dict[str, object] = field(default_factory=dict)
    hosts: List[str] = field(default_factory=list)
    current_host: Optional[str] = None
    num_gpus: int = 0
    job_name: Optional[str] = None
    checkpoint_dir: str = CHECKPOINT_LOCAL_PATH

    @property
    def num_hosts(self) -> int:
        return max(len(self.hosts), 1)


def read_environment(environ: Optional[Mapping[str, str]] = None) -> Optional[SageMakerEnvironment]:
    """The SageMaker environment, or None when not running in a SageMaker training job."""
    env = os.environ if environ is None else environ
    if "SM_MODEL_DIR" not in env or "SM_OUTPUT_DATA_DIR" not in env:
        return None
    channels = {k[len("SM_CHANNEL_"):].lower(): v for k, v in env.items() if k.startswith("SM_CHANNEL_")
                and k[len("SM_CHANNEL_"):].lower() not in SDK_CHANNELS}
    training_env = _json(env, "SM_TRAINING_ENV", {})
    model_dir = env["SM_MODEL_DIR"]
    # /opt/ml/checkpoints sits beside /opt/ml/model; following SM_MODEL_DIR keeps a test's temp /opt/ml whole
    checkpoints = os.path.join(os.path.dirname(os.path.normpath(model_dir)), "checkpoints")
    return SageMakerEnvironment(
        model_dir=model_dir, output_data_dir=env["SM_OUTPUT_DATA_DIR"], channels=channels,
        hyperparameters=_json(env, "SM_HPS", {}), hosts=list(_json(env, "SM_HOSTS", [])),
        current_host=env.get("SM_CURRENT_HOST"), num_gpus=int(env.get("SM_NUM_GPUS") or 0),
        job_name=env.get("TRAINING_JOB_NAME") or training_env.get("job_name"), checkpoint_dir=checkpoints)


def _json(env: Mapping[str, str], name: str, default):
    if not env.get(name):
        return default
    try:
        return json.loads(env[name])
    except ValueError as e:
        raise ValueError(f"${name} is not valid JSON ({e}): {env[name][:200]!r}") from None


def training_arguments(argv: Optional[Sequence[str]] = None) -> List[str]:
    """Command-line arguments with SageMaker's ``--snake_case`` option names (how both SDKs pass
    hyperparameters) rewritten to the CLI's ``--kebab-case``; values are left alone."""
    args = list(sys.argv[1:] if argv is None else argv)
    out = []
    for a in args:
        if a.startswith("--") and "_" in a.split("=", 1)[0]:
            name, eq, value = a.partition("=")
            a = name.replace("_", "-") + eq + value
        out.append(a)
    return out


def _data_channel(sm: SageMakerEnvironment) -> Optional[str]:
    if DATA_CHANNEL in sm.channels:
        return sm.channels[DATA_CHANNEL]
    if len(sm.channels) == 1:
        return next(iter(sm.channels.values()))
    if sm.channels:
        raise ValueError(f"SageMaker channels {sorted(sm.channels)}: name the prepared data channel "
                         f"'{DATA_CHANNEL}' (or give only one channel)")
    return None


def apply_sagemaker_environment(cfg: TrainConfig, environ: Optional[Mapping[str, str]] = None) -> TrainConfig:
    """`cfg` with the container-decided options taken from SageMaker's environment; unchanged
    outside SageMaker. Options given explicitly (command line / hyperparameters) win."""
    env = os.environ if environ is None else environ
    sm = read_environment(env)
    if sm is None:
        return cfg
    defaults = TrainConfig()
    given = set(sm.hyperparameters)
    changes: Dict[str, object] = {
        "data_dir": cfg.data.data_dir or _data_channel(sm),
        "output_dir": cfg.output.output_dir or sm.output_data_dir,
        "checkpoint_dir": cfg.output.checkpoint_dir or sm.checkpoint_dir,
        "run_name": cfg.tracking.run_name or sm.job_name,
    }
    if "progress" not in given:  # progress bars are noise in CloudWatch logs
        changes["progress"] = False
    if env.get("LOCAL_WORLD_SIZE") and env.get("WORLD_SIZE"):  # torchrun: its process layout is the truth
        local, world = int(env["LOCAL_WORLD_SIZE"]), int(env["WORLD_SIZE"])
        changes["devices"], changes["num_nodes"] = local, max(world // local, 1)
    else:
        if cfg.distributed.devices == defaults.distributed.devices and sm.num_gpus > 1:
            changes["devices"] = sm.num_gpus
        changes["num_nodes"] = sm.num_hosts
        if sm.num_hosts > 1:
            raise ValueError(f"{sm.num_hosts} SageMaker hosts but no torchrun environment: launch the job with "
                             "torch_distributed (SDK v2) or Torchrun() (SDK v3)")
    return replace_options(cfg, **changes)


def publish_model(cfg: TrainConfig, environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """Copy the run's exported model (``OUTPUT/model``, written by `twotower_lit.training.run`) into
    SM_MODEL_DIR in the deployable layout: exactly what `twotower_lit.serving.package.package_model`
    puts into model.tar.gz (model files at the top, ``code/inference.py``, the vendored serving
    modules, ``code/requirements.txt``), so the job's model.tar.gz can be deployed as it is.
    Returns SM_MODEL_DIR; None (and nothing done) outside SageMaker."""
    sm = read_environment(environ)
    if sm is None:
        return None
    from twotower_lit.serving.package import package_model

    os.makedirs(sm.model_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        exported = os.path.join(cfg.output.output_dir or sm.output_data_dir, "model")
        tar_path = package_model(exported, os.path.join(tmp, "model.tar.gz"))
        with tarfile.open(tar_path) as tar:
            tar.extractall(sm.model_dir, filter="data")
    return sm.model_dir

