#!/usr/bin/env bash
# Check that every install lane's lock resolves, and that the project's extras resolve within it,
# without installing or downloading any wheel (the CUDA lanes' wheels are several GB):
#   bash scripts/check-locks.sh                 every lane
#   bash scripts/check-locks.sh cpu gpu-torch2.11   some of them
# Lanes: `cpu` (base.txt + torchrec.txt, what scripts/setup.sh installs by default) and one
# `gpu-torchX.Y` per requirements/gpu-torchX.Y.txt. The reports pip writes are left in
# $TWOTOWER_LOCK_REPORTS (default .venv-resolve/reports/).
#
# The package index serves no separate metadata files, so a plain `pip install --dry-run` fetches
# each wheel whole to read its requirements. pip's fast-deps reads only the metadata member of a
# wheel by HTTP range requests, and pip 25.3 and newer no longer fetch the wheels at the end of a
# dry run: hence a small environment of its own with the pip of requirements/resolve.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
TOOL=.venv-resolve
OUT=${TWOTOWER_LOCK_REPORTS:-$TOOL/reports}
want="$(sha256sum requirements/resolve.txt | cut -d' ' -f1)"
if [ ! -f "$TOOL/.twotower-installed" ] || [ "$(cat "$TOOL/.twotower-installed")" != "$want" ]; then
  rm -rf "$TOOL"
  "$PYTHON" -m venv "$TOOL"
  echo '*' > "$TOOL/.gitignore"
  "$TOOL/bin/python" -m pip --disable-pip-version-check -q install -r requirements/resolve.txt
  echo "$want" > "$TOOL/.twotower-installed"
fi
mkdir -p "$OUT"
resolve() {  # report name, then pip arguments
  local name=$1; shift
  rm -f "$OUT/$name.json"
  "$TOOL/bin/python" -m pip --disable-pip-version-check -q install --dry-run --ignore-installed \
    --use-feature=fast-deps --report "$OUT/$name.json" "$@" || { echo "lock $name does not resolve"; return 1; }
}
lanes=("$@")
if [ ${#lanes[@]} -eq 0 ]; then
  lanes=(cpu)
  for f in requirements/gpu-torch*.txt; do lanes+=("$(basename "$f" .txt)"); done
fi
extras=".[serve,report,train,aws,notebooks,tune,dev]"
for lane in "${lanes[@]}"; do
  start=$(date +%s)
  if [ "$lane" = cpu ]; then
    resolve "$lane" -r requirements/base.txt -r requirements/test.txt -r requirements/notebooks.txt "$extras"
    # torchrec goes in with --no-deps (its metadata asks for the CUDA fbgemm-gpu): resolve it alone, and
    # check_lock_report below checks that the lock has everything else it asks for
    resolve "$lane-torchrec" --no-deps -r requirements/torchrec.txt
    torchrec="$OUT/$lane-torchrec.json"
  else
    lock="requirements/$lane.txt"
    [ -f "$lock" ] || { echo "no lane $lane (no $lock)"; exit 2; }
    # base.txt's torch and FBGEMM CPU build give way to the lane's; with the CUDA FBGEMM in the lock,
    # torchrec's own requirements can be resolved along (nothing of them may move a pin)
    grep -vE '^(torch|fbgemm-gpu-cpu)==' requirements/base.txt > "$OUT/$lane-base.txt"
    resolve "$lane" -r "$OUT/$lane-base.txt" -r requirements/test.txt -r requirements/notebooks.txt -r "$lock" "$extras"
    torchrec=""
  fi
  "$TOOL/bin/python" scripts/check_lock_report.py "$lane" "$OUT/$lane.json" ${torchrec:+"$torchrec"}
  echo "lane $lane resolves ($(( $(date +%s) - start )) s)"
done
