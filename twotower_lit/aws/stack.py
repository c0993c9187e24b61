"""The notebooks' one switch: the local stack or real AWS.

``local``: AWS calls go to a moto server started here (S3 and the SageMaker control plane: jobs,
models, endpoint configs, endpoints), training runs on this machine with 2 processes, and the
endpoint (with its shadow variant and data capture) is the project's own server on localhost.
``aws``: the same library calls against the account of the standard credential chain.

`Stack` also keeps the notebooks' shared state (paths, names) in ``<work_dir>/state.json`` so each
notebook can run on its own after the previous ones.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from twotower_lit.aws.config import AwsConfig
from twotower_lit.aws.session import AwsContext

STACKS = ("local", "aws")
LOCAL_ROLE = "arn:aws:iam::123456789012:role/twotower-local"
_FAKE_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_SESSION_TOKEN": "testing"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s") from None
            time.sleep(0.2)


@dataclass
class Stack:
    """Where the notebooks' AWS calls go, and the state they share."""

    mode: str
    work_dir: str
    aws: AwsContext
    _procs: List[subprocess.Popen] = field(default_factory=list)

    @property
    def local(self) -> bool:
        return self.mode == "local"

    @property
    def state_path(self) -> str:
        return os.path.join(self.work_dir, "state.json")

    def state(self) -> Dict[str, Any]:
        if not os.path.exists(self.state_path):
            return {}
        with open(self.state_path) as f:
            return json.load(f)

    def save(self, **values: Any) -> Dict[str, Any]:
        state = {**self.state(), **values}
        with open(self.state_path, "w") as f:
            json.dump(state, f, indent=1, default=str)
        return state

    def need(self, *names: str) -> List[Any]:
        state = self.state()
        missing = [n for n in names if n not in state]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not in {self.state_path}: run the earlier notebooks first")
        return [state[n] for n in names]

    def start(self, args: List[str], ready_url: Optional[str] = None, log_name: str = "process",
              env: Optional[Dict[str, str]] = None) -> subprocess.Popen:
        """A background process stopped by `close` (servers); its output goes to work_dir/<log_name>.log."""
        log = open(os.path.join(self.work_dir, f"{log_name}.log"), "wb")
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self._procs.append(proc)
        if ready_url:
            _wait_http(ready_url, proc, log_name)
        return proc

    def stop(self, proc: subprocess.Popen, timeout: float = 30.0) -> int:
        """SIGTERM (servers flush their data capture on it), then wait."""
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self._procs:
            self._procs.remove(proc)
        return proc.returncode

    def serve(self, model_dir: str, **options: Any) -> str:
        """The project's inference server on a free local port; returns its base URL."""
        port = free_port()
        args = [sys.executable, "-m", "entrypoints.serve", "--model-dir", model_dir, "--host", "127.0.0.1",
                "--port", str(port), "--log-level", "warning"]
        for name, value in options.items():
            args += [f"--{name.replace('_', '-')}", str(value)]
        self.start(args, f"http://127.0.0.1:{port}/ping", log_name=f"serve-{port}")
        return f"http://127.0.0.1:{port}"

    def close(self) -> None:
        for proc in list(self._procs):
            self.stop(proc)


def open_stack(mode: Optional[str] = None, work_dir: Optional[str] = None, project: str = "twotower-notebooks",
               **aws_options: Any) -> Stack:
    """The stack `mode` ('local' or 'aws'; default $TWOTOWER_STACK or 'local'), with its state in
    `work_dir` (default $TWOTOWER_WORK_DIR or ./outputs/notebooks)."""
    mode = mode or os.environ.get("TWOTOWER_STACK", "local")
    if mode not in STACKS:
        raise ValueError(f"stack {mode!r}: choose one of {STACKS}")
    work_dir = os.path.abspath(work_dir or os.environ.get("TWOTOWER_WORK_DIR", os.path.join("outputs", "notebooks")))
    os.makedirs(work_dir, exist_ok=True)
    if mode == "aws":
        return Stack(mode, work_dir, AwsContext(AwsConfig(project=project, **aws_options)))
    # moto in its own process, fake credentials so nothing can reach a real account
    os.environ.update(_FAKE_CREDENTIALS)
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    exe = shutil.which("moto_server", path=os.path.dirname(sys.executable))
    port = free_port()
    stack = Stack(mode, work_dir, aws=None)  # type: ignore[arg-type]  # set once moto answers
    stack.start(([exe] if exe else [sys.executable, "-m", "moto.server"]) + ["-H", "127.0.0.1", "-p", str(port)],
                f"http://127.0.0.1:{port}/moto-api/", "moto")
    stack.aws = AwsContext(AwsConfig(endpoint_url=f"http://127.0.0.1:{port}", region="us-east-1", role=LOCAL_ROLE,
                                     project=project, **aws_options))
    return stack
