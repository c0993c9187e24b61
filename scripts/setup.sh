#!/usr/bin/env bash
# Create (or bring up to date) the project's virtualenv at .venv from the repo's own pinned files.
#   bash scripts/setup.sh                                  CPU lane: torch 2.13, fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0
#   TWOTOWER_GPU=1 bash scripts/setup.sh                   GPU lane, torch 2.13 (requirements/gpu-torch2.13.txt)
#   TWOTOWER_GPU=1 TWOTOWER_TORCH=2.11 bash scripts/setup.sh   GPU lane, torch 2.11 (the README's GPU figures)
#   bash scripts/setup.sh --dry-run                        print the lane's pip commands and stop
# A GPU lane is one requirements/gpu-torchX.Y.txt: the CUDA builds of torch, fbgemm-gpu and torchrec
# of one release line, replacing base.txt's torch and fbgemm-gpu-cpu. torchrec is installed with
# --no-deps: its metadata asks for the CUDA fbgemm-gpu, which would replace the CPU build; every
# dependency it really needs is pinned in requirements/base.txt (scripts/check-locks.sh checks it).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv
dry_run=0
[ "${1:-}" = --dry-run ] && dry_run=1
lanes=$(ls requirements/gpu-torch*.txt | sed 's#requirements/gpu-torch##; s#\.txt##' | paste -sd' ')
torch_minor=${TWOTOWER_TORCH:-2.13}
reqs=(requirements/base.txt requirements/test.txt requirements/notebooks.txt)
variant=cpu
if [ "${TWOTOWER_GPU:-0}" = "1" ]; then
  variant="gpu-torch$torch_minor"
  lock="requirements/$variant.txt"
  [ -f "$lock" ] || { echo "setup: no GPU lane for torch $torch_minor (TWOTOWER_TORCH); lanes: $lanes" >&2; exit 2; }
  reqs+=("$lock")
  torchrec_lock="$lock"
else
  # PyPI has no CPU build of torch for Linux; the CPU lane is the torch this machine's pip installs
  [ "$torch_minor" = 2.13 ] || { echo "setup: the CPU lane is torch 2.13 only; TWOTOWER_TORCH=$torch_minor" \
    "needs TWOTOWER_GPU=1 (GPU lanes: $lanes)" >&2; exit 2; }
  torchrec_lock=requirements/torchrec.txt
  reqs+=("$torchrec_lock")
fi
# a GPU lane's torch and fbgemm-gpu replace base.txt's; torchrec goes in by the second call
base=requirements/base.txt
main_reqs=(-r requirements/test.txt -r requirements/notebooks.txt)
if [ "$variant" != cpu ]; then
  base="$VENV/base-$variant.txt"
  main_reqs+=(-r "$VENV/lane-$variant.txt")
fi
torchrec_pin=$(grep -E '^torchrec==' "$torchrec_lock")
if [ "$dry_run" = 1 ]; then
  echo "lane $variant"
  echo "pip install -r ${base} ${main_reqs[*]}"
  [ "$variant" = cpu ] || echo "  ($base: requirements/base.txt without torch and fbgemm-gpu-cpu;" \
    "$VENV/lane-$variant.txt: $(grep -vE '^(#|torchrec==)' "$lock" | paste -sd' '))"
  echo "pip install --no-deps $torchrec_pin"
  echo "pip install --no-deps -e ."
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  echo "creating $VENV with $($PYTHON --version)"
  "$PYTHON" -m venv "$VENV"
fi
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
if [ "$variant" = cpu ]; then
  pip uninstall -y fbgemm-gpu >/dev/null 2>&1 || true
else
  pip uninstall -y fbgemm-gpu-cpu >/dev/null 2>&1 || true
  grep -vE '^(torch|fbgemm-gpu-cpu)==' requirements/base.txt > "$base"
  grep -vE '^torchrec==' "$lock" > "$VENV/lane-$variant.txt"
fi
pip install -r "$base" "${main_reqs[@]}"
pip install --no-deps "$torchrec_pin"
pip install --no-deps -e .
"$VENV/bin/python" -c "import torchrec, fbgemm_gpu, lightning, mlflow; print('torchrec', torchrec.__version__, '| lightning', lightning.__version__, '| mlflow', mlflow.__version__)"
echo "$want" > "$stamp"
wait_sdk
