#!/usr/bin/env bash
# The GPU test suite (`pytest -m gpu tests/gpu`) on the lent GPU machine, which reaches no package
# registry: TorchRec and FBGEMM as ../shared/tools/gpu/README.md installs them, and the few wheels
# the suite needs beyond the machine's packages (torch, lightning, torchmetrics, numpy), sent along.
#
# Here, once:
#   ../shared/tools/gpu/fetch-wheels.sh        # torchrec's wheels -> .gpu/whl, fbgemm-gpu's in parts -> .gpu/part
#   bash scripts/gpu-tests.sh prepare          # the suite's wheels -> .gpu/test-whl, pyarrow's -> .gpu/test-whl-pyarrow
# Then on the GPU machine, call after call while it stays up (each call carries at most 64 MiB):
#   for each fbgemm part k = 00..09: here `cp .gpu/part/pk .gpu/cur`, there (carry .gpu/cur):
#       mkdir -p /tmp/fb && cp .gpu/cur /tmp/fb/pk
#   bash scripts/gpu-tests.sh stash-pyarrow    (carry .gpu/test-whl-pyarrow; 48 MiB, so a call of its own)
#   bash scripts/gpu-tests.sh install          (carry .gpu/whl and .gpu/test-whl): TorchRec, FBGEMM, the suite's wheels
#   bash scripts/gpu-tests.sh run [PYTEST ARGS] (no carry after `install`): runs the suite (installs first if needed)
#   bash scripts/gpu-tests.sh plant            (no carry; after `run`): the suite must catch a planted bug
# `run` exits with pytest's status; `plant` exits 0 only when the planted bug made the suite fail.
set -euo pipefail
cd "$(dirname "$0")/.."

SITE=/tmp/site
FBGEMM=/tmp/fbgemm_gpu-1.6.0-cp312-cp312-manylinux_2_28_x86_64.whl
# pytest and what it imports (the repository's addopts need pytest-timeout); versions as requirements/test.txt
PYTEST_WHEELS="pytest==9.2.0 pytest-timeout==2.4.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 pygments==2.21.0"
# the project's light runtime dependencies on the training, export and evaluation paths (requirements/base.txt)
RUNTIME_WHEELS="safetensors==0.8.0 filelock==4.3.1 tqdm==4.67.1 psutil==7.2.2"
PYARROW_WHEEL="pyarrow==25.0.1"  # the loader reads the Parquet shards with it

download() {  # wheels for the GPU machine's Python 3.12 on x86-64 Linux, without their dependencies
  local dest=$1; shift
  mkdir -p "$dest"
  "${PYTHON:-python3}" -m pip download -q --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform any --no-deps -d "$dest" "$@"
}

env_for_tests() {
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
  export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
}

# install the wheels under .gpu/test-whl (and /tmp/pyarrow-whl) whose modules the machine lacks:
# its own packages are kept, so that nothing it already runs on is shadowed by another version
install_test_wheels() {
  local missing=() wheels=() name
  # (what an earlier call installed into $SITE counts as there)
  local check="env PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} python3 -c"
  $check "import pytest, pytest_timeout" 2>/dev/null || missing+=(pytest pytest_timeout pluggy iniconfig packaging pygments)
  for name in safetensors filelock tqdm psutil pyarrow; do
    $check "import $name" 2>/dev/null || missing+=("$name")
  done
  for name in "${missing[@]}"; do
    local pattern=${name//_/[-_]}
    # (one wheel per package; pyarrow's comes by its own call, see the header)
    local found
    found=$(ls .gpu/test-whl/$pattern-[0-9]*.whl /tmp/pyarrow-whl/$pattern-[0-9]*.whl 2>/dev/null | head -1 || true)
    if [ -z "$found" ]; then
      echo "gpu-tests: the machine has no '$name' and no wheel of it was sent: run 'prepare' here and send" \
           ".gpu/test-whl (or, for pyarrow, the 'stash-pyarrow' call) first" >&2
      exit 3
    fi
    wheels+=("$found")
  done
  if [ ${#wheels[@]} -gt 0 ]; then
    echo "gpu-tests: installing into $SITE: ${wheels[*]##*/}"
    python3 -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$SITE" "${wheels[@]}"
  fi
}

install_torchrec() {  # as ../shared/tools/gpu/README.md, once per machine
  if [ -d "$SITE/fbgemm_gpu" ] && [ -d "$SITE/torchrec" ]; then
    return
  fi
  ls /tmp/fb/p[0-9][0-9] > /dev/null 2>&1 || { echo "gpu-tests: no fbgemm parts in /tmp/fb (see the header)" >&2; exit 3; }
  cat /tmp/fb/p[0-9][0-9] > "$FBGEMM"
  python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$FBGEMM" .gpu/whl/*.whl
}

case "${1:-}" in
  prepare)
    download .gpu/test-whl $PYTEST_WHEELS $RUNTIME_WHEELS
    download .gpu/test-whl-pyarrow $PYARROW_WHEEL
    ls -la .gpu/test-whl .gpu/test-whl-pyarrow
    ;;
  stash-pyarrow)
    mkdir -p /tmp/pyarrow-whl && cp .gpu/test-whl-pyarrow/*.whl /tmp/pyarrow-whl/
    ;;
  install)
    install_torchrec
    install_test_wheels
    ;;
  run)
    shift
    install_torchrec
    install_test_wheels
    env_for_tests
    nvidia-smi --query-gpu=name,driver_version --format=csv,noheader || true
    python3 -c "import torch, torchrec, fbgemm_gpu, lightning; print('torch', torch.__version__, 'torchrec', torchrec.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
    exec python3 -m pytest -m gpu -q tests/gpu "$@"
    ;;
  plant)
    # The suite must fail on a graphed step whose replays skip the optimizer: the optimizer's step
    # is left out of the captured graph (eager warm-up steps still take it). Applied to a copy of
    # the tree, never to the tree itself.
    env_for_tests
    copy=/tmp/planted-tree
    rm -rf "$copy" && mkdir -p "$copy"
    tar --exclude=./.gpu --exclude=./.venv --exclude=./.git -cf - . | tar -xf - -C "$copy"
    # (the step being captured is the one after the warm-up; without capture, CPU, nothing changes)
    sed -i 's/^        self\.optimizer\.step()$/        (self.capture and self.eager_steps >= self.warmup) or self.optimizer.step()/' \
      "$copy/twotower_lit/graphs.py"
    planted=$(grep -c "self.eager_steps >= self.warmup) or self.optimizer.step()" "$copy/twotower_lit/graphs.py" || true)
    [ "$planted" = 1 ] || { echo "gpu-tests: the planted line did not apply once (applied $planted times)" >&2; exit 3; }
    set +e
    (cd "$copy" && python3 -m pytest -m gpu -q tests/gpu/test_gpu_steps.py -k graphed_steps -p no:cacheprovider) \
      2>&1 | tee /tmp/planted.log
    rc=${PIPESTATUS[0]}
    set -e
    # failed on the comparison itself, not on an error elsewhere
    if [ "$rc" = 1 ] && grep -q "^E .*AssertionError" /tmp/planted.log; then
      echo "gpu-tests: the planted bug (replays without the optimizer step) made the suite fail, as it must"
      exit 0
    fi
    echo "gpu-tests: with the planted bug the suite exited $rc (1, failed tests, was expected)" >&2
    exit 1
    ;;
  *)
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit 2
    ;;
esac
