#!/usr/bin/env bash
# Mutation testing of the core modules with mutmut (requirements/mutation.txt), one module at a time
# against the fast tests that exercise it. Too slow for the default CI run; run it by hand:
#   bash scripts/mutation.sh                 every module below, one after another
#   bash scripts/mutation.sh readers loader  some of them
#   bash scripts/mutation.sh --list          the modules and their tests
# Each module runs in a scratch copy under build/mutation/<module>/ (the working tree is never
# mutated); the per-module summary is printed and written to build/mutation/<module>/summary.txt,
# the surviving mutants' diffs to build/mutation/<module>/survivors.diff. docs/testing.md has the
# figures of the last full run and why each remaining survivor is equivalent.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=${PYTHON:-$REPO/.venv/bin/python}
JOBS=${MUTATION_JOBS:-2}

# module name | file to mutate | the pytest arguments that select its tests (';' between arguments)
MODULES=(
  "losses|twotower_lit/losses.py|tests/quality/test_losses.py"
  "metrics|twotower_lit/metrics.py|tests/training/test_metrics.py;tests/quality/test_baselines.py"
  "splits|twotower_lit/data/splits.py|tests/data/test_splits.py"
  "readers|twotower_lit/data/readers.py|tests/data/test_readers.py;tests/data/test_refused_inputs.py;-k;not entrypoints"
  "loader|twotower_lit/data/loader.py|tests/training/test_loader.py;tests/training/test_resume_rows.py;-k;not one_process_checkpoint and not after_an_epochs_last_batch"
  "format|twotower_lit/export/format.py|tests/export/test_export_manifest.py;tests/serving/test_recommender.py;-k;not evaluate and not serve_refuses"
  "request|twotower_lit/serving/request.py|tests/serving/test_request_parsing.py"
  "capture|twotower_lit/serving/capture.py|tests/serving/test_capture_writer.py;tests/serving/test_capture_and_report.py;-k;capture_writer or capture_record or rotate or verdicts"
  "checkpoint|twotower_lit/distributed/checkpoint.py|tests/training/test_checkpoint_integrity.py"
)

if [ "${1:-}" = "--list" ]; then
  printf '%s\n' "${MODULES[@]}" | column -t -s '|'
  exit 0
fi
# mutmut goes into a folder of its own, on PYTHONPATH for these runs only: installed into .venv, its
# dependencies (rich) would be imported by the serving stack there and change what the tests see
TOOL=$REPO/build/mutation/tool
want="$(sha256sum requirements/mutation.txt | cut -d' ' -f1)"
if [ "$(cat "$TOOL/.installed" 2>/dev/null)" != "$want" ]; then
  echo "installing requirements/mutation.txt into $TOOL"
  rm -rf "$TOOL"
  "$PY" -m pip --disable-pip-version-check -q install --no-deps --target "$TOOL" -r requirements/mutation.txt
  echo "$want" > "$TOOL/.installed"
fi
export PYTHONPATH="$TOOL${PYTHONPATH:+:$PYTHONPATH}"

wanted=("$@")
if [ ${#wanted[@]} -eq 0 ]; then
  for entry in "${MODULES[@]}"; do wanted+=("${entry%%|*}"); done
fi
for want in "${wanted[@]}"; do  # in the order asked for
  entry=""
  for candidate in "${MODULES[@]}"; do
    [ "${candidate%%|*}" = "$want" ] && entry=$candidate
  done
  [ -n "$entry" ] || { echo "no such module: $want; see --list"; exit 2; }
  IFS='|' read -r name file tests <<< "$entry"
  work=build/mutation/$name
  rm -rf "$work"
  mkdir -p "$work"
  # the working tree's files (committed or not, nothing ignored), so tests find entrypoints/, benchmarks/ etc.
  git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
    [ -f "$f" ] && mkdir -p "$work/$(dirname "$f")" && cp "$f" "$work/$f"
  done
  # the project's pytest settings plus this module's mutmut section (mutmut reads ./pyproject.toml)
  "$PY" - "$work/pyproject.toml" "$file" "$tests" <<'PY'
import json, sys
out, file, tests = sys.argv[1:]
tests = tests.split(";")
text = open("pyproject.toml").read().replace('addopts = "-ra --timeout=900 --durations=20"',
                                              'addopts = "--timeout=300 -p no:cacheprovider"')
text += "\n[tool.mutmut]\n"
text += 'source_paths = ["twotower_lit"]\n'
# mutmut runs the tests in <work>/mutants/: everything else the tests use goes along
others = sorted(p for p in __import__("os").listdir(__import__("os").path.dirname(out))
                if p not in ("twotower_lit", "tests", "pyproject.toml", "mutants"))
text += f"also_copy = {json.dumps(others)}\n"
text += f"only_mutate = [{json.dumps(file)}]\n"
text += f"pytest_add_cli_args_test_selection = {json.dumps(tests)}\n"
text += 'pytest_add_cli_args = ["-x", "-q"]\n'
text += 'process_isolation = "forkserver"\n'  # torch is not fork-safe once pytest ran in the process
text += "use_git_change_detection = false\n"
open(out, "w").write(text)
PY
  echo "== $name: mutating $file against: ${tests//;/ }"
  start=$(date +%s)
  # mutmut redraws a progress line; the log keeps one line per redraw's end
  if ! (cd "$work" && "$PY" -m mutmut run --max-children "$JOBS") 2>&1 | tr '\r' '\n' | grep -v '^\s*$' \
      | awk '!/^[^ ]* [0-9]+\/[0-9]+ / || NR % 50 == 0' > "$work/run.log"; then
    tail -40 "$work/run.log"; echo "mutmut run failed for $name (log: $work/run.log)"; exit 1
  fi
  (cd "$work" && "$PY" -m mutmut results --all true) > "$work/results.txt" 2>&1 || true
  "$PY" - "$work" "$name" "$(( $(date +%s) - start ))" <<'PY'
import collections, re, subprocess, sys
work, name, seconds = sys.argv[1:]
status = collections.Counter()
survivors = []
for line in open(f"{work}/results.txt"):
    m = re.match(r"\s*(\S+): (\w[\w ]*)$", line.rstrip())
    if m:
        status[m.group(2)] += 1
        if m.group(2) == "survived":
            survivors.append(m.group(1))
total = sum(status.values())
killed = status["killed"] + status["timeout"]
score = 100.0 * killed / total if total else float("nan")
lines = [f"{name}: {killed}/{total} killed ({score:.1f}%), {seconds} s; " +
         ", ".join(f"{k} {v}" for k, v in sorted(status.items()))]
lines += [f"  survived: {s}" for s in survivors]
open(f"{work}/summary.txt", "w").write("\n".join(lines) + "\n")
print("\n".join(lines))
with open(f"{work}/survivors.diff", "w") as f:
    for s in survivors:
        f.write(subprocess.run([sys.executable, "-m", "mutmut", "show", s], cwd=work, capture_output=True,
                               text=True).stdout + "\n")
PY
done
