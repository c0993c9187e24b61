"""What runs inside the SageMaker containers: the image, the training job's requirements.txt and
the source directory shipped with the job.

Images. AWS's PyTorch training images known to the SDKs stop at torch 2.8 (v2 2.257.7; v3 3.27.0
knows 2.10) and the inference images at 2.6 (November 2026), while TorchRec 1.6-1.9 needs torch
2.11-2.14. So the training job either

* runs on AWS's training image and its requirements.txt installs a newer torch with the matching
  fbgemm-gpu and torchrec (``container_torch``, default 2.13.0: slower start, nothing to build), or
* runs on an image that already has them (``image_uri`` + ``container_torch="image"``).

Serving needs torch only (the export is torch-only), so AWS's older inference image works as it
is, and so does our own image (`Dockerfile`).

Requirements. torchrec's metadata asks for an unpinned ``fbgemm-gpu`` (and tensordict, which
asks for torch): left to pip that would pull the newest builds and replace the image's torch. The
generated file pins torch, fbgemm-gpu, torchrec and every package of torchrec's dependency closure
that depends on torch (tensordict, torchmetrics), so pip's resolution of torchrec can neither
replace torch nor pick another fbgemm-gpu build: what ``pip install --no-deps torchrec`` protects
against, in a file format that has no per-package ``--no-deps``.
GPU jobs get PyPI's fbgemm-gpu (the CUDA build, made for PyPI's torch of the same release);
CPU jobs get the CPU builds of both from PyTorch's CPU index when its URL is set in
``TWOTOWER_TORCH_CPU_INDEX_URL`` (``fbgemm-gpu-cpu`` cannot be used: torchrec would still pull the
CUDA ``fbgemm-gpu`` over it). The other pins come from
``requirements/base.txt``, the same file the local environment is built from.
"""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE_REQUIREMENTS = os.path.join(REPO_ROOT, "requirements", "base.txt")
AWS_REQUIREMENTS = os.path.join(REPO_ROOT, "requirements", "aws.txt")
TRAIN_ENTRY = "entrypoints/train.py"
# PyTorch's own index of CPU builds (its address is given by the user, e.g. in the job's
# environment); without it CPU jobs install the default builds, which also run on CPU, only larger
CPU_INDEX_ENV = "TWOTOWER_TORCH_CPU_INDEX_URL"

# torch release -> (fbgemm-gpu, torchrec) built and tested together (FINDINGS.md: both verified)
TORCHREC_STACK: Dict[str, Tuple[str, str]] = {
    "2.13": ("1.8.0", "1.8.0"),
    "2.11": ("1.6.0", "1.6.1"),
}
# what the container needs beyond base.txt's runtime pins
_NOT_IN_CONTAINER = {"torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec"}

# AWS Deep Learning Containers: registry account per region (default 763104351884), from the
# SageMaker SDKs' image_uri_config/pytorch.json, v2 2.257.7 and v3 3.27.0 (the tests compare with
# each SDK's own lookup)
_DLC_DEFAULT_ACCOUNT = "763104351884"
_DLC_ACCOUNTS = {
    "af-south-1": "626614931356", "ap-east-1": "871362719292", "ap-east-2": "975050140332",
    "ap-northeast-3": "364406365360", "ap-south-2": "772153158452", "ap-southeast-3": "907027046896",
    "ap-southeast-4": "457447274322", "ap-southeast-5": "550225433462", "ap-southeast-6": "633930458069",
    "ap-southeast-7": "590183813437", "ca-west-1": "204538143572", "cn-north-1": "727897471807",
    "cn-northwest-1": "727897471807", "eu-central-2": "380420809688", "eu-south-1": "692866216735",
    "eu-south-2": "503227376785", "il-central-1": "780543022126", "me-central-1": "914824155844",
    "me-south-1": "217643126080", "me-west-1": "124382933778", "mx-central-1": "637423239942",
    "us-gov-east-1": "446045086412", "us-gov-west-1": "442386744353",
}


def is_gpu_instance(instance_type: str) -> bool:
    """ml.g*/ml.p* instances have NVIDIA GPUs (as the SageMaker SDK decides it)."""
    family = instance_type.split(".")[1] if instance_type.startswith("ml.") else instance_type
    return family[:1] in ("g", "p")


def dlc_image_uri(region: str, scope: str, framework_version: str, py_version: str, instance_type: str) -> str:
    """AWS's PyTorch image URI (``scope``: training or inference) for a region and instance type."""
    if scope not in ("training", "inference"):
        raise ValueError(f"scope must be training or inference, not {scope!r}")
    account = _DLC_ACCOUNTS.get(region, _DLC_DEFAULT_ACCOUNT)
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    kind = "gpu" if is_gpu_instance(instance_type) else "cpu"
    return f"{account}.dkr.ecr.{region}.{domain}/pytorch-{scope}:{framework_version}-{kind}-{py_version}"


def torchrec_stack(torch_version: str) -> Tuple[str, str]:
    """(fbgemm-gpu, torchrec) for a torch version, or a ValueError listing the supported ones."""
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    if minor not in TORCHREC_STACK:
        raise ValueError(f"no verified fbgemm-gpu/torchrec pairing for torch {torch_version}; "
                         f"supported: {', '.join(sorted(TORCHREC_STACK))} (or --container-torch image with an "
                         "image that has torchrec installed)")
    return TORCHREC_STACK[minor]


def read_pins(path: str) -> Dict[str, str]:
    """``{normalised name: requirement line}`` of a pinned requirements file."""
    pins: Dict[str, str] = {}
    with open(path) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if not line or line.startswith("-"):
                continue
            name = re.split(r"[\[=<>!~; ]", line, maxsplit=1)[0]
            pins[normalise(name)] = line
    return pins


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def training_requirements(instance_type: str, container_torch: str, mlflow_plugin: bool = False) -> str:
    """The training job's requirements.txt (see the module docstring for why it looks like this)."""
    runtime = {n: line for n, line in read_pins(BASE_REQUIREMENTS).items() if n not in _NOT_IN_CONTAINER}
    lines = ["# twotower_lit training job requirements (twotower_lit/aws/container.py)"]
    if container_torch != "image":
        fbgemm, torchrec = torchrec_stack(container_torch)
        gpu = is_gpu_instance(instance_type)
        lines += [f"# torch {container_torch} with its fbgemm-gpu {fbgemm} ({'CUDA' if gpu else 'CPU'} build) and "
                  f"torchrec {torchrec}; torch and everything of torchrec's that needs torch are pinned, so pip "
                  "can neither replace torch nor pick another fbgemm-gpu"]
        cpu_index = os.environ.get(CPU_INDEX_ENV)
        if not gpu and cpu_index:
            lines.append(f"--extra-index-url {cpu_index}")
        lines += [f"torch=={container_torch}", f"fbgemm-gpu=={fbgemm}", f"torchrec=={torchrec}"]
    else:
        lines.append("# the image provides torch, fbgemm-gpu and torchrec")
    lines += sorted(runtime.values(), key=str.lower)
    if mlflow_plugin:
        lines.append(read_pins(AWS_REQUIREMENTS)["sagemaker-mlflow"])
    return "\n".join(lines) + "\n"


@dataclass
class SourceDir:
    """A staged copy of what the job runs: ``entrypoints/`` (train and inference), the
    ``twotower_lit`` package and requirements.txt."""

    path: str
    entry_point: str = TRAIN_ENTRY
    requirements: str = "requirements.txt"


def stage_source_dir(dest: str, requirements: str) -> SourceDir:
    """Copy the code the training job needs into `dest` (a fresh folder) and write requirements.txt."""
    if os.path.exists(dest) and os.listdir(dest):
        raise FileExistsError(f"{dest} is not empty")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".*")
    shutil.copytree(os.path.join(REPO_ROOT, "twotower_lit"), os.path.join(dest, "twotower_lit"), ignore=ignore,
                    dirs_exist_ok=True)
    os.makedirs(os.path.join(dest, "entrypoints"), exist_ok=True)
    # train.py runs the job; inference.py goes into the job's model.tar.gz (environment.publish_model)
    for name in ("__init__.py", "train.py", "inference.py"):
        shutil.copy2(os.path.join(REPO_ROOT, "entrypoints", name), os.path.join(dest, "entrypoints", name))
    with open(os.path.join(dest, "requirements.txt"), "w") as f:
        f.write(requirements)
    return SourceDir(dest)


def source_files(path: str) -> List[str]:
    """Relative paths of the files in a staged source dir (for messages and tests)."""
    out = []
    for folder, _, files in os.walk(path):
        out += [os.path.relpath(os.path.join(folder, f), path).replace(os.sep, "/") for f in files]
    return sorted(out)


def serving_environment(program: str = "inference.py", extra: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """Container environment of a model on AWS's PyTorch inference image: the handler module comes
    from ``code/`` inside model.tar.gz (the layout `twotower_lit.export.package` writes)."""
    env = {"SAGEMAKER_PROGRAM": program, "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
           "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "TWOTOWER_NUM_THREADS": "1"}
    env.update(extra or {})
    return env
