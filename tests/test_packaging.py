"""Packaging: the extras declared in pyproject.toml against what the code imports and what the lock
pins, the install lanes of scripts/setup.sh, and the serving image's install line. Resolution of
each lane's lock against the package index is scripts/check-locks.sh, and a fresh `.[serve]`
environment is scripts/check-serve-extra.sh (both run by .ci/run: they need the network)."""
from __future__ import annotations

import importlib.metadata as md
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
REQS = REPO / "requirements"
# what the serving image must never carry
TRAINING_STACK = {"torchrec", "fbgemm_gpu", "lightning", "pytorch_lightning", "mlflow", "pandas", "pyarrow"}


def declared(extra: str | None = None) -> list[Requirement]:
    specs = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(s) for s in specs]


def pins(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            out[canonicalize_name(Requirement(name).name)] = version
    return out


def closure(requirements: list[Requirement]) -> set[str]:
    """The distributions these requirements bring in, read from this environment's metadata."""
    seen: set[str] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in seen or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        seen.add(name)
        try:
            todo.extend(Requirement(r) for r in md.requires(name) or [])
        except md.PackageNotFoundError:
            pass
    return seen


def test_the_serving_stack_needs_only_the_core_and_the_serve_extra():
    # what the interpreter itself loaded at start-up (site hooks of installed packages) is left out
    code = """
import json, sys
before = {m.split('.')[0] for m in sys.modules}
import twotower_lit.serving.server, twotower_lit.serving.app, twotower_lit.serving.handler
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules} - before)))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)), check=True)
    modules = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert not TRAINING_STACK & modules, sorted(TRAINING_STACK & modules)
    owners = md.packages_distributions()
    # imported when present, and not needed (scripts/check-serve-extra.sh runs the server without them)
    optional = {"tqdm": "torch.hub", "pygments": "httpx"}
    used = {canonicalize_name(d) for m in modules for d in owners.get(m, [])} - {"twotower-lit", *optional}
    provided = closure(declared() + declared("serve"))
    assert used <= provided, f"imported by the server but not declared by the core or [serve]: {used - provided}"
    # and the extra declares nothing the training stack needs
    assert not {"torchrec", "lightning", "mlflow", "pandas", "pyarrow"} & closure(declared() + declared("serve"))


def test_every_pin_of_the_lock_lies_within_the_declared_ranges():
    lock: dict[str, str] = {}
    for name in ("base.txt", "torchrec.txt", "test.txt", "notebooks.txt", "aws.txt"):
        lock.update(pins(REQS / name))
    extras = PROJECT["optional-dependencies"]
    assert {"serve", "train", "aws", "notebooks", "dev"} <= set(extras)
    checked = 0
    for req in declared() + [r for extra in extras for r in declared(extra)]:
        name = canonicalize_name(req.name)
        assert name in lock, f"{req} is declared but not pinned in requirements/*.txt (the tested lock)"
        assert req.specifier.contains(Version(lock[name])), f"the lock pins {name}=={lock[name]}, outside {req}"
        checked += 1
    assert checked >= 25
    for lane in REQS.glob("gpu-torch*.txt"):
        torch = Requirement(next(s for s in PROJECT["dependencies"] if s.startswith("torch")))
        assert torch.specifier.contains(Version(pins(lane)["torch"])), lane.name


def test_train_declares_torchrecs_needs_but_neither_torchrec_nor_an_fbgemm_build():
    names = {canonicalize_name(r.name) for extra in PROJECT["optional-dependencies"] for r in declared(extra)}
    assert not {"torchrec", "fbgemm-gpu", "fbgemm-gpu-cpu"} & names
    train = {canonicalize_name(r.name) for r in declared() + declared("train")}
    needs = {canonicalize_name(Requirement(r).name) for r in md.requires("torchrec")} - {"fbgemm-gpu"}
    assert needs and needs <= train, needs - train


def test_gpu_lanes_pair_torch_with_its_own_fbgemm_and_torchrec():
    from twotower_lit.aws.container import TORCHREC_STACK

    lanes = {}
    for path in sorted(REQS.glob("gpu-torch*.txt")):
        lane = pins(path)
        assert set(lane) == {"torch", "fbgemm-gpu", "torchrec"}, path.name
        minor = ".".join(lane["torch"].split(".")[:2])
        assert path.name == f"gpu-torch{minor}.txt"
        lanes[minor] = lane
    # the lane every GPU figure came from, and the default one
    assert lanes["2.11"] == {"torch": "2.11.0", "fbgemm-gpu": "1.6.0", "torchrec": "1.6.1"}
    cpu = {**pins(REQS / "base.txt"), **pins(REQS / "torchrec.txt")}
    default = lanes[".".join(cpu["torch"].split(".")[:2])]
    assert (default["torch"], default["fbgemm-gpu"], default["torchrec"]) == \
        (cpu["torch"], cpu["fbgemm-gpu-cpu"], cpu["torchrec"]), "the CPU lane and its GPU twin differ"
    # the SageMaker job installs the same pairing for the image's torch
    for minor, (fbgemm, torchrec) in TORCHREC_STACK.items():
        assert (lanes[minor]["fbgemm-gpu"], lanes[minor]["torchrec"]) == (fbgemm, torchrec), minor


def setup_copy(tmp_path: Path) -> Path:
    """scripts/setup.sh with the files it reads, in a directory of its own: a run that went past
    --dry-run would fail at once (PYTHON=false) instead of touching the project's .venv."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO / "scripts" / "setup.sh", root / "scripts")
    shutil.copytree(REQS, root / "requirements")
    shutil.copy(REPO / "pyproject.toml", root)
    return root


def run_setup(root: Path, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith("TWOTOWER_")}
    full.update(PYTHON="false", TWOTOWER_SDK_ENVS="0", **env)
    return subprocess.run(["bash", "scripts/setup.sh", "--dry-run"], cwd=root, env=full, capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("torch_minor", ["2.11", "2.12", "2.13"])
def test_setup_installs_the_chosen_gpu_lane_and_torchrec_without_its_dependencies(tmp_path, torch_minor):
    root = setup_copy(tmp_path)
    lane = pins(REQS / f"gpu-torch{torch_minor}.txt")
    proc = run_setup(root, TWOTOWER_GPU="1", TWOTOWER_TORCH=torch_minor)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == f"lane gpu-torch{torch_minor}"
    assert f"pip install --no-deps torchrec=={lane['torchrec']}" in lines
    assert f"torch=={lane['torch']} fbgemm-gpu=={lane['fbgemm-gpu']})" in proc.stdout
    assert "fbgemm-gpu-cpu" not in " ".join(x for x in lines if x.startswith("pip install"))
    assert not (root / ".venv").exists()


def test_setup_default_lane_is_the_cpu_build_and_unknown_lanes_are_refused(tmp_path):
    root = setup_copy(tmp_path)
    cpu = run_setup(root)
    assert cpu.returncode == 0, cpu.stderr
    assert cpu.stdout.splitlines()[:3] == [
        "lane cpu",
        "pip install -r requirements/base.txt -r requirements/test.txt -r requirements/notebooks.txt",
        f"pip install --no-deps torchrec=={pins(REQS / 'torchrec.txt')['torchrec']}",
    ]
    unknown = run_setup(root, TWOTOWER_GPU="1", TWOTOWER_TORCH="2.10")
    assert unknown.returncode == 2 and "no GPU lane for torch 2.10" in unknown.stderr
    assert "lanes: 2.11 2.12 2.13" in unknown.stderr
    cpu_other = run_setup(root, TWOTOWER_TORCH="2.11")
    assert cpu_other.returncode == 2 and "TWOTOWER_GPU=1" in cpu_other.stderr
    assert not (root / ".venv").exists()


def report_of_this_environment(tmp_path: Path, drop=(), add=()) -> Path:
    """A `pip install --report`-shaped file listing this environment's distributions (the CPU lane)."""
    items = [{"metadata": {"name": d.metadata["Name"], "version": d.version, "requires_dist": d.requires or []}}
             for d in md.distributions() if canonicalize_name(d.metadata["Name"]) not in drop]
    items += [{"metadata": {"name": n, "version": v, "requires_dist": []}} for n, v in add]
    path = tmp_path / f"report-{len(items)}.json"
    path.write_text(json.dumps({"install": items}))
    return path


def test_lock_report_check_catches_the_cuda_fbgemm_and_a_missing_torchrec_dependency(tmp_path):
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import check_lock_report
    finally:
        sys.path.remove(str(REPO / "scripts"))
    torchrec = tmp_path / "torchrec.json"
    torchrec.write_text(json.dumps({"install": [{"metadata": {
        "name": "torchrec", "version": md.version("torchrec"), "requires_dist": md.requires("torchrec")}}]}))
    assert check_lock_report.main("cpu", str(report_of_this_environment(tmp_path)), str(torchrec)) == []
    cuda = report_of_this_environment(tmp_path, add=[("fbgemm-gpu", md.version("fbgemm-gpu-cpu"))])
    assert any("fbgemm-gpu " in e for e in check_lock_report.main("cpu", str(cuda), str(torchrec)))
    no_tensordict = report_of_this_environment(tmp_path, drop={"tensordict"})
    assert any("torchrec needs tensordict" in e for e in check_lock_report.main("cpu", str(no_tensordict),
                                                                               str(torchrec)))


def test_the_serving_image_installs_the_serve_extra_and_takes_a_torch_index_at_build_time():
    dockerfile = (REPO / "Dockerfile").read_text()
    install = re.search(r'pip install (.+?)"(\S+)\[serve\]"', dockerfile)
    assert install and "-c /tmp/serving.txt" in install.group(1)
    # (no registry address is written in the repository: the CPU index is given at build time)
    assert re.search(r"^ARG TORCH_INDEX_URL=$", dockerfile, re.M), dockerfile
    assert "--extra-index-url \"$TORCH_INDEX_URL\"" in install.group(1)
