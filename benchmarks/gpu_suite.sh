#!/usr/bin/env bash
# GPU part of the benchmark suite: training throughput on 1 and 2 GPUs, ml-1m- and ML-32M-shaped
# tables, batch 8k and 64k per GPU, each invocation timing the Lightning path, eager DMP, TorchRec's
# pipeline, plain PyTorch and the step replayed as a CUDA graph (one GPU, or replicated tables) side by side. Results:
# printed, and appended as JSON lines to $1. Then the in-batch softmax of the default objective on one GPU
# (`benchmarks/loss_bench.py`: the job's implementation against the same terms written plainly).
# Several GPUs run each case twice: tables sharded table_wise, and replicated (data_parallel), which
# is what the training job does with these tables on several GPUs (--data-parallel-below-mb).
#   bash benchmarks/gpu_suite.sh results.jsonl [STEPS]
set -euo pipefail
out=${1:-gpu_results.jsonl}
steps=${2:-100}
gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
for n in ${GPU_COUNTS:-1 2}; do
  [ "$n" -le "$gpus" ] || { echo "skipping $n GPUs: only $gpus present"; continue; }
  for shape in ml-1m ml-32m; do
    for batch in 8192 65536; do
      shardings=table_wise; [ "$n" -gt 1 ] && shardings="table_wise data_parallel"
      for sharding in $shardings; do
        modes=lightning,lightning_multistep,eager,pipeline,plain
        # CUDA graphs (the training job's --cuda-graphs): one GPU, or several with every table replicated
        { [ "$n" -eq 1 ] || [ "$sharding" = data_parallel ]; } && modes="$modes,graphed"
        CUDA_VISIBLE_DEVICES=$(seq -s, 0 $((n - 1))) torchrun --standalone --nproc_per_node "$n" \
          -m benchmarks.train_throughput --shape "$shape" --batch "$batch" --steps "$steps" \
          --sharding "$sharding" --modes "$modes" --json "$out"
      done
    done
  done
done
CUDA_VISIBLE_DEVICES=0 python3 -m benchmarks.loss_bench
