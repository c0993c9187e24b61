#!/usr/bin/env bash
# Show that `pip install .[serve]` alone runs the server: a fresh virtualenv (.venv-serve, rebuilt
# every time) gets the package with its `serve` extra, pinned to the lock as the Dockerfile pins it
# (the same grep of requirements/base.txt), plus pytest; then
#   - importing the installed server, app and handler loads neither torchrec, fbgemm_gpu, lightning,
#     mlflow, pandas nor pyarrow;
#   - tests/serving runs with that interpreter, except what needs more than the extra: the shadow
#     report's tests (pyarrow, the `report` extra) and the SageMaker toolkit's (sagemaker-inference,
#     the `dev` extra; AWS's inference image brings it); and the adversarial load test, a minute of
#     traffic through the same modules that the main suite runs.
# .ci/run calls it; a run takes about two minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
VENV=.venv-serve
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
echo '*' > "$VENV/.gitignore"
pins="$VENV/pins.txt"
# the Dockerfile's own pin list, so that this checks the install the image makes
names=$(grep -oE "grep -E '\^\([^)]*\)==' /tmp/base.txt" Dockerfile | sed -E "s/grep -E '\^\(([^)]*)\)=='.*/\1/")
[ -n "$names" ] || { echo "check-serve-extra: no pin list in the Dockerfile"; exit 1; }
grep -E "^($names)==" requirements/base.txt > "$pins"
grep -E '^(pytest|pytest-timeout)==' requirements/test.txt >> "$pins"
"$VENV/bin/python" -m pip --disable-pip-version-check -q install -c "$pins" ".[serve]" pytest pytest-timeout
"$VENV/bin/python" -m pip --disable-pip-version-check -q check
# from outside the checkout, so that the installed package is what gets imported
(cd / && "$OLDPWD/$VENV/bin/python" - <<'EOF'
import sys
import twotower_lit.serving.app
import twotower_lit.serving.handler
import twotower_lit.serving.server
assert twotower_lit.__file__.startswith(sys.prefix), f"imported {twotower_lit.__file__}, not the installed package"
heavy = {"torchrec", "fbgemm_gpu", "lightning", "pytorch_lightning", "mlflow", "pandas", "pyarrow"}
loaded = heavy & {name.split(".")[0] for name in sys.modules}
assert not loaded, f"the serving stack imports {sorted(loaded)}"
print("serve extra: the server imports none of", ", ".join(sorted(heavy)))
EOF
)
# (batch recommendations write Parquet and S3: twotower_lit.batch needs the [train] and [aws] extras)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/serving --ignore=tests/serving/test_adversarial.py \
  --ignore=tests/serving/test_batch_recommend.py \
  --ignore=tests/serving/test_capture_and_report.py \
  --deselect tests/serving/test_inference_contract.py::test_toolkit_transformer_serves_the_packaged_handler \
  --deselect tests/serving/test_json_lines.py::test_the_inference_toolkit_serves_json_lines \
  --deselect tests/serving/test_inference_contract.py::test_toolkit_server_errors_are_json_with_the_traceback_in_the_log_only
