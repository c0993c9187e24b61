"""The in-batch sampled softmax of `--loss softmax|both`, forward and backward: the training job's
implementation (`twotower_lit.losses.sampled_softmax_terms`, backward written out) against the same
terms written with autograd's operations (`plain_sampled_softmax_terms`), in one invocation.

    python -m benchmarks.loss_bench [--device cuda] [--rows 65536] [--block 1024] [--negatives 0]

The shapes are the training job's on ML-32M-sized batches: `--rows` rated rows per rank scored in
blocks of `--block` (`--softmax-rows`), tower outputs of `--dim`, items drawn from a Zipf-like
popularity so that blocks hold accidental hits. The two run alternately; each figure is the median
over `--repeats` timed rounds of `--steps` forward-and-backward passes; matmuls on TF32 tensor
cores as in the training job unless `--tf32 false` (a GPU setting). Prints a Markdown table
(milliseconds per pass, samples/s, peak memory on a GPU) and the largest difference of their
losses and gradients.
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch

from twotower_lit.losses import plain_sampled_softmax_terms, sampled_softmax_terms


def inputs(rows: int, block: int, dim: int, negatives: int, num_items: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    k = rows // block
    # popularity ~ 1/rank: the head items recur within a block, as in MovieLens
    popularity = 1.0 / torch.arange(1, num_items + 1, dtype=torch.float64)
    items = torch.multinomial(popularity, k * block * (1 + negatives), replacement=True, generator=g) + 1
    candidate_items = items.view(k, block * (1 + negatives))
    log_q = (popularity / popularity.sum()).log()[candidate_items - 1].float() + torch.log(torch.tensor(block - 1.0))
    queries = torch.randn(k, block, dim, generator=g) * 0.3
    candidates = torch.randn(k, block * (1 + negatives), dim, generator=g) * 0.3
    weights = (torch.rand(k, block, generator=g) > 0.45).float()
    positive = torch.arange(block).expand(k, block).contiguous()
    to = lambda t: t.to(device)  # noqa: E731
    return (to(queries).requires_grad_(), to(candidates).requires_grad_(), to(positive), to(candidate_items),
            to(log_q), to(weights))


def one_pass(fn: Callable, args, temperature: float):
    queries, candidates, positive, items, log_q, weights = args
    total, weight = fn(queries, candidates, positive, items, log_q, temperature, weights)
    loss = total / weight.clamp(min=1.0)
    grads = torch.autograd.grad(loss, (queries, candidates))
    return loss.detach(), grads


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, default=65536, help="rated rows per batch (per rank)")
    p.add_argument("--block", type=int, default=1024, help="rows per softmax block (--softmax-rows)")
    p.add_argument("--negatives", type=int, default=0, help="uniform negatives per rated row")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--items", type=int, default=87585, help="catalogue size (ML-32M's)")
    p.add_argument("--temperature", type=float, default=0.5)
    p.add_argument("--steps", type=int, default=0, help="passes per timed round (0: 20 on a GPU, 2 on a CPU)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tf32", choices=("true", "false"), default="true",
                   help="float32 matmuls on TF32 tensor cores, as the training job does on GPUs (its --tf32)")
    args = p.parse_args(argv)
    torch.set_float32_matmul_precision("high" if args.tf32 == "true" else "highest")
    if args.rows % args.block:
        p.error(f"--rows {args.rows} must be a multiple of --block {args.block}")
    device = torch.device(args.device)
    steps = args.steps or (20 if device.type == "cuda" else 2)
    data = inputs(args.rows, args.block, args.dim, args.negatives, args.items, device)
    impls: Dict[str, Callable] = {"autograd's operations (plain)": plain_sampled_softmax_terms,
                                  "backward written out (the job's)": sampled_softmax_terms}
    results = {name: one_pass(fn, data, args.temperature) for name, fn in impls.items()}  # (also the warm-up)
    (loss_a, grads_a), (loss_b, grads_b) = results.values()
    difference = max([abs(loss_a - loss_b).item()] + [(a - b).abs().max().item() for a, b in zip(grads_a, grads_b)])
    times: Dict[str, List[float]] = {name: [] for name in impls}
    peaks: Dict[str, int] = {}
    for _ in range(args.repeats):
        for name, fn in impls.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            sync(device)
            t0 = time.perf_counter()
            for _ in range(steps):
                one_pass(fn, data, args.temperature)
            sync(device)
            times[name].append((time.perf_counter() - t0) / steps)
            if device.type == "cuda":
                peaks[name] = torch.cuda.max_memory_allocated(device) - base
    scores = args.rows * args.block * (1 + args.negatives)
    print(f"sampled softmax, forward + backward: {args.rows:,} rated rows in blocks of {args.block:,} "
          f"({scores / 1e6:.0f} M scores), {args.negatives} negatives per row, dim {args.dim}, TF32 {args.tf32}, "
          f"on {device} "
          f"({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}); median of {args.repeats} "
          f"rounds of {steps} passes")
    print("| implementation | ms per pass | rows/s (M) | peak memory above inputs (MB) |")
    print("|---|---|---|---|")
    for name in impls:
        ms = statistics.median(times[name]) * 1e3
        peak = f"{peaks[name] / 2**20:,.0f}" if name in peaks else "-"
        print(f"| {name} | {ms:.3f} | {args.rows / ms / 1e3:.1f} | {peak} |")
    plain, fused = (statistics.median(times[n]) for n in impls)
    print(f"speed-up {plain / fused:.2f}x; largest difference of the loss and gradients: {difference:.2e}")


if __name__ == "__main__":
    main()
