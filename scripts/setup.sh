#!/usr/bin/env bash
# Create (or bring up to date) the project's virtualenv at .venv from the repo's own pinned files.
#   bash scripts/setup.sh            CPU build (fbgemm-gpu-cpu)
#   TWOTOWER_GPU=1 bash scripts/setup.sh   CUDA build (fbgemm-gpu), for GPU machines
# torchrec is installed with --no-deps: its metadata asks for the CUDA fbgemm-gpu, which would
# replace the CPU build; every dependency it really needs is pinned in requirements/base.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
reqs=(requirements/base.txt requirements/test.txt requirements/notebooks.txt requirements/torchrec.txt)
variant=cpu
if [ "${TWOTOWER_GPU:-0}" = "1" ]; then variant=gpu; reqs+=(requirements/gpu.txt); fi
stamp="$VENV/.twotower-installed"
want="$variant $(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)"
# The SageMaker SDK majors need environments of their own (tests/aws/test_sdk_environments.py);
# built in the background while the main one installs. TWOTOWER_SDK_ENVS=0 skips them.
sdk_env() {  # name, then pip arguments
  local dir=".venv-sagemaker-$1"; shift
  local want_sdk
  want_sdk="$(cat requirements/aws.txt requirements/sdk-*.txt | sha256sum | cut -d' ' -f1)"
  if [ -f "$dir/.twotower-installed" ] && [ "$(cat "$dir/.twotower-installed")" = "$want_sdk" ]; then return 0; fi
  "$PYTHON" -m venv "$dir" && echo '*' > "$dir/.gitignore" &&
    "$dir/bin/python" -m pip --disable-pip-version-check -q install "$@" &&
    if [ "$dir" = .venv-sagemaker-v3 ]; then
      "$dir/bin/python" -m pip --disable-pip-version-check -q install --no-deps -r requirements/sdk-v3-nodeps.txt
    fi &&
    echo "$want_sdk" > "$dir/.twotower-installed"
}
sdk_pids=()
if [ "${TWOTOWER_SDK_ENVS:-1}" = "1" ]; then
  (sdk_env v2 -r requirements/aws.txt -r requirements/sdk-test.txt > .venv-sdk-v2.log 2>&1) & sdk_pids+=($!)
  (sdk_env v3 -r requirements/sdk-v3.txt -r requirements/sdk-test.txt > .venv-sdk-v3.log 2>&1) & sdk_pids+=($!)
fi
wait_sdk() {
  for pid in "${sdk_pids[@]}"; do
    wait "$pid" || { echo "a SageMaker SDK environment failed to install:"; tail -20 .venv-sdk-v*.log; exit 1; }
  done
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV is up to date ($variant)"
  wait_sdk
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ "$variant" = gpu ]; then
  pip uninstall -y fbgemm-gpu-cpu >/dev/null 2>&1 || true
  grep -v '^fbgemm-gpu-cpu' requirements/base.txt > "$VENV/base-gpu.txt"
  pip install -r "$VENV/base-gpu.txt" -r requirements/test.txt -r requirements/notebooks.txt -r requirements/gpu.txt
else
  pip install -r requirements/base.txt -r requirements/test.txt -r requirements/notebooks.txt
fi
pip install --no-deps -r requirements/torchrec.txt
pip install --no-deps -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, lightning, mlflow; print('torchrec', torchrec.__version__, '| lightning', lightning.__version__, '| mlflow', mlflow.__version__)"
echo "$want" > "$stamp"
wait_sdk
