"""The serving image: the command its `serve` runs starts the server (no Docker here: the command
is taken from the Dockerfile and run on this machine, with the model where SageMaker mounts it
pointed to by SM_MODEL_DIR)."""
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[2]
DOCKERFILE = (REPO / "Dockerfile").read_text()


def serve_script() -> str:
    m = re.search(r"RUN printf '(.+?)' > /usr/local/bin/serve", DOCKERFILE)
    assert m, "the Dockerfile must write /usr/local/bin/serve"
    return m.group(1).encode().decode("unicode_escape")


def test_image_contract():
    assert re.search(r"^EXPOSE 8080$", DOCKERFILE, re.M)
    assert re.search(r'^CMD \["serve"\]$', DOCKERFILE, re.M)
    pinned = re.search(r"grep -E '\^\((.+?)\)==' /tmp/base.txt", DOCKERFILE).group(1).split("|")
    # everything the serving code imports at run time is installed, at base.txt's pins
    code = """
import sys, json
import twotower_lit.serving.server, twotower_lit.serving.app, entrypoints.inference
print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(REPO)))
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    third_party = {"torch", "numpy", "safetensors", "starlette", "uvicorn", "httpx"}
    assert third_party <= loaded and set(pinned) == third_party | {"faiss-cpu"}  # faiss: imported by --search faiss
    assert not {"torchrec", "fbgemm_gpu", "lightning", "mlflow", "pyarrow", "pandas", "boto3"} & loaded
    for name in pinned:
        assert re.search(rf"^{name}==", (REPO / "requirements" / "base.txt").read_text(), re.M), name


def test_binds_localhost_unless_told_and_the_image_binds_every_interface_as_an_unprivileged_user():
    from twotower_lit.serving.handler import config_from_env
    from twotower_lit.serving.server import parse_args

    assert parse_args([]).host == "127.0.0.1" and parse_args(["serve"]).host == "127.0.0.1"
    assert parse_args(["--host", "0.0.0.0"]).host == "0.0.0.0"
    env = dict(re.findall(r"\b(TWOTOWER_\w+)=(\S+)", " ".join(re.findall(r"^ENV (.+?)(?<!\\)$", DOCKERFILE,
                                                                            re.M | re.S))))
    assert env.get("TWOTOWER_HOST") == "0.0.0.0", "SageMaker reaches the container on its network interface"
    assert config_from_env(env).host == "0.0.0.0"
    users = re.findall(r"^USER (\S+)$", DOCKERFILE, re.M)
    assert users and users[-1].split(":")[0] not in ("root", "0"), users
    uid = users[-1].split(":")[0]
    assert re.search(rf"useradd [^\n]*--uid {uid}\b", DOCKERFILE), "the user the image runs as is created in it"
    assert DOCKERFILE.index("USER ") > DOCKERFILE.rindex("RUN "), "nothing is installed after dropping root"


@pytest.mark.timeout(180)
def test_the_serve_command_starts_the_server(tmp_path):
    from twotower_lit.serving.synthetic import random_export

    model = tmp_path / "opt" / "ml" / "model"
    random_export(str(model), num_users=10, num_items=30, seed=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    serve = bin_dir / "serve"
    serve.write_text(serve_script())
    serve.chmod(serve.stat().st_mode | stat.S_IEXEC)
    port = free_port()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}",
               PYTHONPATH=str(REPO), SM_MODEL_DIR=str(model), TWOTOWER_PORT=str(port), TWOTOWER_HOST="127.0.0.1")
    # SageMaker runs the image with the argument `serve`; CMD makes that the default too
    proc = subprocess.Popen(["serve"], env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "no /ping answer in 120 s"
            time.sleep(0.2)
        r = httpx.post(f"http://127.0.0.1:{port}/invocations", json={"user_id": 1, "k": 3}, timeout=10)
        assert r.status_code == 200 and len(r.json()["predictions"][0]["items"]) == 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
