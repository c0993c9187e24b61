"""What runs inside the SageMaker containers: the image, the training job's requirements.txt and
the source directory shipped with the job.

Images. TorchRec 1.6-1.9 needs torch 2.11-2.14, and fbgemm-gpu must be the build made for the
exact torch it runs on. AWS's PyTorch training images stop at torch 2.10 (``pytorch-training``,
December 2026; the SDKs know 2.8 (v2 2.257.7) and 2.10 (v3 3.27.0)), so the default training image
is AWS's Hugging Face PyTorch training image, the newest AWS training image with a torch TorchRec
runs on: torch 2.11.0 with CUDA 13.0, the torch that fbgemm-gpu 1.6.0 (CUDA 13 build) and
torchrec 1.6.1 were verified with on GPUs. It has the SageMaker training toolkit both SDKs'
launchers need. It is a GPU image; AWS has no CPU training image with such a torch, so CPU jobs
take ``image_uri`` (an image of one's own with torch, e.g. ``python:3.12`` plus
``pip install sagemaker-training torch==2.13.0``) and its ``image_torch``.

Requirements. The job's requirements.txt never installs torch: it pins the image's own torch
version (which pip finds satisfied, so nothing is downloaded), the fbgemm-gpu and torchrec built
for it (unless ``image_has_torchrec``), every package of torchrec's dependency closure that
depends on torch (tensordict, torchmetrics), so pip's resolution of torchrec can neither replace
torch nor pick another fbgemm-gpu build: what ``pip install --no-deps torchrec`` protects
against, in a file format that has no per-package ``--no-deps``.
GPU jobs get PyPI's fbgemm-gpu (the CUDA build, made for PyPI's torch of the same release);
CPU jobs get the CPU build from PyTorch's CPU index when its URL is set in
``TWOTOWER_TORCH_CPU_INDEX_URL`` (``fbgemm-gpu-cpu`` cannot be used: torchrec would still pull the
CUDA ``fbgemm-gpu`` over it). The other pins come from ``requirements/base.txt``, the same file
the local environment is built from.

Serving needs torch only (the export is torch-only), so AWS's older inference image works as it
is, and so does our own image (`Dockerfile`).
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

# torch release -> (fbgemm-gpu, torchrec) built and tested together (the lanes of requirements/)
TORCHREC_STACK: Dict[str, Tuple[str, str]] = {
    "2.13": ("1.8.0", "1.8.0"),
    "2.11": ("1.6.0", "1.6.1"),
}
# what the container needs beyond base.txt's runtime pins
_NOT_IN_CONTAINER = {"torch", "fbgemm-gpu-cpu", "fbgemm-gpu", "torchrec"}

# The default training image (GPU): repository, tag, and the torch inside it (see the module docstring)
DEFAULT_TRAINING_REPOSITORY = "huggingface-pytorch-training"
DEFAULT_TRAINING_TAG = "2.11.0-transformers5.13.1-cu130-amzn2023"
DEFAULT_TRAINING_TORCH = "2.11.0"

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


def ecr_image_uri(region: str, repository: str, tag: str) -> str:
    """An AWS Deep Learning Container image URI: the region's DLC registry, repository and tag."""
    account = _DLC_ACCOUNTS.get(region, _DLC_DEFAULT_ACCOUNT)
    domain = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"{account}.dkr.ecr.{region}.{domain}/{repository}:{tag}"


def dlc_image_uri(region: str, scope: str, framework_version: str, py_version: str, instance_type: str) -> str:
    """AWS's PyTorch image URI (``scope``: training or inference) for a region and instance type."""
    if scope not in ("training", "inference"):
        raise ValueError(f"scope must be training or inference, not {scope!r}")
    kind = "gpu" if is_gpu_instance(instance_type) else "cpu"
    return ecr_image_uri(region, f"pytorch-{scope}", f"{framework_version}-{kind}-{py_version}")


def training_image(region: str, instance_type: str, image_uri: Optional[str] = None,
                   image_torch: Optional[str] = None) -> Tuple[str, str]:
    """``(image URI, the torch version inside it)`` of the training job: the default image for GPU
    instances, or the given one, whose torch must be given too (it decides what the job installs)."""
    if image_uri:
        if not image_torch:
            raise ValueError(f"--image-uri {image_uri}: give the torch version inside it with --image-torch "
                             f"(e.g. 2.11.0): the job installs the fbgemm-gpu and torchrec built for that torch")
        return image_uri, image_torch
    if not is_gpu_instance(instance_type):
        raise ValueError(f"--instance-type {instance_type} has no GPU, and AWS has no CPU training image with torch "
                         f"2.11-2.14 (what TorchRec 1.6-1.9 needs): pass --image-uri (an image with torch and the "
                         f"sagemaker-training toolkit, see README 'SageMaker') and --image-torch")
    if image_torch and image_torch.split("+")[0] != DEFAULT_TRAINING_TORCH:
        raise ValueError(f"--image-torch {image_torch} without --image-uri: the default training image has torch "
                         f"{DEFAULT_TRAINING_TORCH}")
    return ecr_image_uri(region, DEFAULT_TRAINING_REPOSITORY, DEFAULT_TRAINING_TAG), DEFAULT_TRAINING_TORCH


def torchrec_stack(torch_version: str) -> Tuple[str, str]:
    """(fbgemm-gpu, torchrec) for a torch version, or a ValueError listing the supported ones."""
    minor = ".".join(torch_version.split("+")[0].split(".")[:2])
    if minor not in TORCHREC_STACK:
        raise ValueError(f"no verified fbgemm-gpu/torchrec pairing for torch {torch_version}; "
                         f"supported: {', '.join(sorted(TORCHREC_STACK))} (or --image-has-torchrec true with an "
                         "image that has them installed)")
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


def training_requirements(instance_type: str, image_torch: str, mlflow_plugin: bool = False,
                          image_has_torchrec: bool = False) -> str:
    """The training job's requirements.txt for an image whose torch is `image_torch` (see the
    module docstring for why it looks like this): it never installs torch."""
    runtime = {n: line for n, line in read_pins(BASE_REQUIREMENTS).items() if n not in _NOT_IN_CONTAINER}
    torch_release = image_torch.split("+")[0]  # 2.11.0+cu130 -> 2.11.0: pip matches the local build
    lines = ["# twotower_lit training job requirements (twotower_lit/aws/container.py)",
             f"# torch {torch_release} is the image's own: pinned so that nothing pip resolves replaces it"]
    if not image_has_torchrec:
        fbgemm, torchrec = torchrec_stack(torch_release)
        gpu = is_gpu_instance(instance_type)
        lines.append(f"# fbgemm-gpu {fbgemm} ({'CUDA' if gpu else 'CPU'} build) and torchrec {torchrec} are the "
                     f"builds for torch {torch_release}; everything of torchrec's that needs torch is pinned too")
        cpu_index = os.environ.get(CPU_INDEX_ENV)
        if not gpu and cpu_index:
            lines.append(f"--extra-index-url {cpu_index}")
        lines += [f"torch=={torch_release}", f"fbgemm-gpu=={fbgemm}", f"torchrec=={torchrec}"]
    else:
        lines += ["# the image provides fbgemm-gpu and torchrec", f"torch=={torch_release}"]
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
    from ``code/`` inside model.tar.gz (the layout `twotower_lit.serving.package` writes)."""
    env = {"SAGEMAKER_PROGRAM": program, "SAGEMAKER_SUBMIT_DIRECTORY": "/opt/ml/model/code",
           "SAGEMAKER_CONTAINER_LOG_LEVEL": "20", "TWOTOWER_NUM_THREADS": "1"}
    env.update(extra or {})
    return env
