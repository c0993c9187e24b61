"""The training job's container: requirements.txt, the staged source dir, image URIs."""
import re
import subprocess
import sys
from importlib import metadata

import pytest
from packaging.requirements import Requirement

from twotower_lit.aws import container


def pins(text: str) -> dict:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-")):
            req = Requirement(line)
            out[container.normalise(req.name)] = str(req.specifier)
    return out


def depends_on_torch(name: str, seen=None) -> bool:
    """Whether an installed distribution needs torch, directly or through its own requirements."""
    seen = set() if seen is None else seen
    if name in seen:
        return False
    seen.add(name)
    try:
        reqs = metadata.requires(name) or []
    except metadata.PackageNotFoundError:
        return False
    for r in map(Requirement, reqs):
        if r.marker and not r.marker.evaluate({"extra": ""}):
            continue
        dep = container.normalise(r.name)
        if dep == "torch" or depends_on_torch(dep, seen):
            return True
    return False


def torchrec_closure() -> set:
    todo, seen = ["torchrec"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for r in map(Requirement, reqs):
            if not r.marker or r.marker.evaluate({"extra": ""}):
                todo.append(container.normalise(r.name))
    return seen


def test_the_default_training_image_keeps_its_own_torch():
    """The job's requirements pin the default image's own torch (pip finds it installed and
    downloads nothing) and the fbgemm-gpu/torchrec builds for exactly that torch."""
    image, torch = container.training_image("us-east-1", "ml.g5.2xlarge")
    assert image == ("763104351884.dkr.ecr.us-east-1.amazonaws.com/huggingface-pytorch-training:"
                     "2.11.0-transformers5.13.1-cu130-amzn2023")
    assert image.split(":")[-1].startswith(torch + "-")  # AWS's tags start with the image's torch
    p = pins(container.training_requirements("ml.g5.2xlarge", torch))
    assert p["torch"] == f"=={torch}"
    assert (p["fbgemm-gpu"], p["torchrec"]) == tuple("==" + v for v in container.torchrec_stack(torch))
    # the installed build string of the image's torch satisfies the pin: pip keeps it
    from packaging.specifiers import SpecifierSet

    assert "2.11.0+cu130" in SpecifierSet(p["torch"])
    assert "2.13.0" not in SpecifierSet(p["torch"])


def test_a_given_image_needs_its_torch_and_cpu_instances_need_an_image():
    with pytest.raises(ValueError, match="--image-torch"):
        container.training_image("us-east-1", "ml.g5.2xlarge", "123.dkr.ecr.us-east-1.amazonaws.com/mine:1")
    with pytest.raises(ValueError, match="no GPU.*--image-uri"):
        container.training_image("us-east-1", "ml.m5.xlarge")
    with pytest.raises(ValueError, match="default training image has torch 2.11.0"):
        container.training_image("us-east-1", "ml.g5.2xlarge", image_torch="2.13.0")
    assert container.training_image("us-east-1", "ml.m5.xlarge", "mine:1", "2.13.0+cpu") == ("mine:1", "2.13.0+cpu")
    assert pins(container.training_requirements("ml.m5.xlarge", "2.13.0+cpu"))["torch"] == "==2.13.0"


@pytest.mark.parametrize("instance_type,gpu", [("ml.g5.12xlarge", True), ("ml.p4d.24xlarge", True),
                                               ("ml.m5.xlarge", False), ("ml.c5.2xlarge", False)])
def test_requirements_pin_the_torch_stack_so_pip_cannot_replace_torch(instance_type, gpu, monkeypatch):
    monkeypatch.setenv(container.CPU_INDEX_ENV, "https://index.example/cpu")
    text = container.training_requirements(instance_type, "2.13.0")
    p = pins(text)
    assert (p["torch"], p["fbgemm-gpu"], p["torchrec"]) == ("==2.13.0", "==1.8.0", "==1.8.0")
    assert "fbgemm-gpu-cpu" not in p  # torchrec would pull the CUDA fbgemm-gpu over it
    assert ("--extra-index-url https://index.example/cpu" in text) is (not gpu)
    # every package of torchrec's dependency closure that needs torch is pinned exactly
    needs_torch = {n for n in torchrec_closure() if n != "torchrec" and (n == "fbgemm-gpu" or depends_on_torch(n))}
    needs_torch.discard("fbgemm-gpu-cpu")  # what this CPU venv has instead of fbgemm-gpu
    assert needs_torch, "the closure was not computed"
    for name in needs_torch | {"fbgemm-gpu"}:
        assert p.get(name, "").startswith("=="), f"{name} is in torchrec's closure, needs torch, and is not pinned"


def test_runtime_pins_are_base_txt_and_mlflow_plugin_only_for_an_arn():
    base = container.read_pins(container.BASE_REQUIREMENTS)
    p = pins(container.training_requirements("ml.g5.xlarge", "2.11.0"))
    assert (p["torch"], p["fbgemm-gpu"], p["torchrec"]) == ("==2.11.0", "==1.6.0", "==1.6.1")
    for name, line in base.items():
        if name not in ("torch", "fbgemm-gpu-cpu"):
            assert p[name] == str(Requirement(line).specifier), name
    assert "sagemaker-mlflow" not in p
    assert "sagemaker-mlflow" in pins(container.training_requirements("ml.g5.xlarge", "2.13.0", mlflow_plugin=True))


def test_an_image_with_torchrec_gets_neither_and_unknown_torch_is_refused():
    p = pins(container.training_requirements("ml.g5.xlarge", "2.13.0", image_has_torchrec=True))
    assert p["torch"] == "==2.13.0" and not {"fbgemm-gpu", "torchrec"} & set(p) and "lightning" in p
    with pytest.raises(ValueError, match="supported: 2.11, 2.13"):
        container.training_requirements("ml.g5.xlarge", "2.8.0")


def test_requirements_file_parses_with_pip(tmp_path):
    """pip itself reads the generated file (options and pins), without installing anything."""
    path = tmp_path / "requirements.txt"
    path.write_text(container.training_requirements("ml.m5.xlarge", "2.13.0"))
    from pip._internal.network.session import PipSession
    from pip._internal.req.req_file import parse_requirements

    parsed = list(parse_requirements(str(path), session=PipSession()))
    assert {container.normalise(Requirement(r.requirement).name) for r in parsed} >= {"torch", "fbgemm-gpu", "torchrec"}


def test_staged_source_dir_runs_train_py_as_a_script(tmp_path):
    src = container.stage_source_dir(str(tmp_path / "src"), "torch==2.13.0\n")
    files = container.source_files(src.path)
    assert {"entrypoints/train.py", "entrypoints/inference.py", "requirements.txt",
            "twotower_lit/aws/environment.py", "twotower_lit/training/job.py"} <= set(files)
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]
    proc = subprocess.run([sys.executable, "entrypoints/train.py", "--max_epochs", "1", "--help"], cwd=src.path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--max-epochs" in proc.stdout, proc.stderr
    with pytest.raises(FileExistsError):
        container.stage_source_dir(src.path, "")


@pytest.mark.parametrize("region,instance,scope,expected", [
    ("us-east-1", "ml.g5.2xlarge", "training",
     "763104351884.dkr.ecr.us-east-1.amazonaws.com/pytorch-training:2.8.0-gpu-py312"),
    ("eu-south-1", "ml.m5.large", "inference",
     "692866216735.dkr.ecr.eu-south-1.amazonaws.com/pytorch-inference:2.8.0-cpu-py312"),
    ("cn-north-1", "ml.m5.large", "training",
     "727897471807.dkr.ecr.cn-north-1.amazonaws.com.cn/pytorch-training:2.8.0-cpu-py312"),
])
def test_dlc_image_uri(region, instance, scope, expected):
    assert container.dlc_image_uri(region, scope, "2.8.0", "py312", instance) == expected
    assert re.match(r"^\d{12}\.dkr\.ecr\.", expected)
