#!/usr/bin/env bash
# GPU end to end: prepare synthetic sets, then train with the product's command
# (`entrypoints.train`: Parquet shards -> DataModule -> Lightning + TorchRecStrategy -> export)
# on 1 and 2 GPUs, and print each run's training samples/s and test metrics.
#   bash benchmarks/gpu_e2e.sh WORKDIR [SIZES]     SIZES: space-separated rating counts (default "1000000")
# Environment: BATCH, EPOCHS, WORKERS, EXTRA (more entrypoints.train options), GPU_COUNTS (default "1 2"),
# REPEATS (default 1): rounds over GPU_COUNTS, interleaved so that a machine's drift hits every count;
# with more than one GPU count a summary per size gives each count's mean, its ratio to the first's, and the
# ratio within each round (adjacent runs, less exposed to a machine's drift) with their median.
# MLflow is switched off (--mlflow-uri none) so the run needs no tracking packages on the GPU box.
set -euo pipefail
work=${1:-/tmp/twotower-gpu}
sizes=${2:-1000000}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
for n in $sizes; do
  layout=ml-1m; [ "$n" -gt 10000000 ] && layout=ml-32m
  python3 -m entrypoints.prepare --synthetic "$n" --synthetic-layout "$layout" --output-dir "$work/data-$n" | tail -3
  rates="$work/rates-$n.txt"
  : > "$rates"
  for r in $(seq 1 "${REPEATS:-1}"); do
    for g in ${GPU_COUNTS:-1 2}; do
      [ "$g" -le "$gpus" ] || continue
      out="$work/run-$n-${g}gpu-$r"
      # several GPUs: torchrun starts every rank at once (with --devices alone, Lightning starts the
      # others only when fit begins, after rank 0's start-up, which then counts in the fit's time)
      launch="python3"; [ "$g" -gt 1 ] && launch="torchrun --standalone --nproc_per_node $g"
      $launch -m entrypoints.train --data-dir "$work/data-$n" --output-dir "$out" --accelerator gpu --devices "$g" \
        --max-epochs "${EPOCHS:-1}" --batch-size "${BATCH:-16384}" --num-workers "${WORKERS:-6}" \
        --mlflow-uri none --progress false ${EXTRA:-} > "$out.log" 2>&1 || { tail -30 "$out.log"; exit 1; }
      python3 - "$out/metrics.json" "$n" "$g" "$rates" <<'PY'
import json, sys
m = json.load(open(sys.argv[1])); t = m["train"]; s = m["test"]
epochs = " / ".join(f"{r / 1e6:.2f}" for r in t["epoch_samples_per_s"])
print(f"{int(sys.argv[2]):>11,} ratings {sys.argv[3]} GPU(s): {t['samples_per_s'] / 1e6:6.2f} M samples/s in the "
      f"training loop ({t['steps']} steps, {t['loop_seconds']} s; per epoch {epochs}); {t['fit_samples_per_s'] / 1e6:.2f} M/s over the "
      f"whole fit ({t['seconds']} s incl. validation) | test AUC {s['auc']:.4f} "
      f"Recall@10 {s['recall@10']:.4f} | popularity Recall@10 {m['baselines']['popularity']['recall@10']:.4f}")
with open(sys.argv[4], "a") as f:
    f.write(f"{sys.argv[3]} {t['samples_per_s']}\n")
PY
    done
  done
  python3 - "$rates" "$n" <<'PY'
import statistics, sys
runs = {}
for line in open(sys.argv[1]):
    g, rate = line.split()
    runs.setdefault(int(g), []).append(float(rate) / 1e6)
if len(runs) > 1:
    base = statistics.mean(runs[min(runs)])
    for g, rates in sorted(runs.items()):
        line = (f"{int(sys.argv[2]):>11,} ratings {g} GPU(s), {len(rates)} run(s): mean {statistics.mean(rates):.2f} M "
                f"samples/s (runs {', '.join(f'{r:.2f}' for r in rates)}), {statistics.mean(rates) / base:.2f}x "
                f"the {min(runs)}-GPU mean")
        if g != min(runs):  # each round's runs are adjacent in time: their ratio is less exposed to drift
            ratios = [r / b for r, b in zip(rates, runs[min(runs)])]
            line += (f"; per round {', '.join(f'{x:.2f}' for x in ratios)}x "
                     f"(median {statistics.median(ratios):.2f}x)")
        print(line)
PY
done
