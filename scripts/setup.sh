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
reqs=(requirements/base.txt requirements/test.txt requirements/torchrec.txt)
variant=cpu
if [ "${TWOTOWER_GPU:-0}" = "1" ]; then variant=gpu; reqs+=(requirements/gpu.txt); fi
stamp="$VENV/.twotower-installed"
want="$variant $(cat "${reqs[@]}" pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "$VENV is up to date ($variant)"
  exit 0
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check -q "$@"; }
if [ "$variant" = gpu ]; then
  pip uninstall -y fbgemm-gpu-cpu >/dev/null 2>&1 || true
  grep -v '^fbgemm-gpu-cpu' requirements/base.txt > "$VENV/base-gpu.txt"
  pip install -r "$VENV/base-gpu.txt" -r requirements/test.txt -r requirements/gpu.txt
else
  pip install -r requirements/base.txt -r requirements/test.txt
fi
pip install --no-deps -r requirements/torchrec.txt
pip install --no-deps -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, lightning, mlflow; print('torchrec', torchrec.__version__, '| lightning', lightning.__version__, '| mlflow', mlflow.__version__)"
echo "$want" > "$stamp"
