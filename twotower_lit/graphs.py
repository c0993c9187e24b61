"""The training step as one CUDA graph: captured once, replayed for every batch of the same shape.

Why: on a GPU the eager step is bound by its host's work, not the GPU's: the host launches ~100
kernels through TorchRec's sharded collection, the towers, the loss, autograd and the optimizers,
and needs longer for that than the GPU needs to run them. Replaying a captured graph launches all of
them with one call (`benchmarks/GPU_RESULTS.md` has the figures).

A graph replays fixed shapes and addresses, so every batch is copied into tensors made once
(`FixedShapeInput`), and the KeyedJaggedTensor the model reads is built from them inside the
graph. The multi-valued feature (genres) has a different number of values in every batch: its
values get a fixed capacity, and the slots that a batch does not fill are padding, id 0, spread
over the rows (at most one more value per row while the padding is under the row count, so no
bag gets long). Row 0 of that table is the out-of-vocabulary row, which no training value uses
(genre indices start at 1); it is set to zero before the first step and after every step, so
the padding adds exactly zero to every sum, and each row's mean divides by its real bag length
(`twotower_lit.model.TwoTower.forward`'s ``bag_lengths``). The model trains exactly as without
padding (tests/training/test_graphs.py compares the weights).

Several processes capture the same step, all-reduce of the replicated parameters' gradients
included (NCCL records it in the graph), when every table is replicated
(`twotower_lit.distributed.planning.graph_refusal`). Their model is built on the capture stream
(`on_capture_stream` says why).

The step's other conditions: a constant learning rate (TorchRec's fused embedding optimizers read
it when the kernel is launched, so the graph keeps the one of its capture), no host
synchronisation inside the step (the loss builds no data-dependent shapes), and optimizers that
can step inside a capture (``capturable``, set here for those that have the option).
"""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from twotower_lit.data.batches import Batch

# capacity of the multi-valued feature: this much above the first batch's count (plus a few slots)
CAPACITY_SLACK = 0.05
WARMUP_STEPS = 3  # eager steps on the capture stream before capturing (PyTorch's recipe: lazy state, cuBLAS)

LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_capture_streams: Dict[int, "torch.cuda.Stream"] = {}  # per GPU index (`capture_stream`)
_host_work: Optional[List[Callable[[], None]]] = None  # host work of the step being captured (`on_every_replay`)


def capture_stream(device: torch.device) -> "torch.cuda.Stream":
    """The side stream that training steps on GPU `device` are captured on: one per GPU, made on first use."""
    index = torch.cuda.current_device() if device.index is None else device.index
    if index not in _capture_streams:
        _capture_streams[index] = torch.cuda.Stream(device=index)
    return _capture_streams[index]


@contextlib.contextmanager
def on_capture_stream(device: torch.device) -> Iterator[None]:
    """Run the block on `device`'s capture stream, ordered after and before the current stream's
    work; on a CPU device, as it is. Build a model whose steps will be captured under this.

    Why: autograd accumulates a parameter's gradient on the stream that was current when the
    parameter's accumulator node was made, and keeps that node while anything references it.
    TorchRec's replicated (data_parallel) tables are views of their lookup's fused weight
    (``TableBatchedEmbeddingSlice``, TorchRec 1.6-1.9), made when the sharded collection is built,
    and those views keep the weight's node alive. Built on the default stream, every backward pass
    then hands the weight's gradient over to the default stream, which a capture on another stream
    refuses (``cudaErrorStreamCaptureImplicit`` in the backward pass of FBGEMM's dense lookup).
    Built on the capture stream, the node accumulates there; eager steps on the default stream
    synchronise with it as autograd does between any two streams."""
    if device.type != "cuda":
        yield
        return
    current, stream = torch.cuda.current_stream(device), capture_stream(device)
    stream.wait_stream(current)
    with torch.cuda.stream(stream):
        yield
    current.wait_stream(stream)


def on_every_replay(work: Callable[[], None]) -> None:
    """Register host work of the step being captured, to run again after every later replay.

    A graph replays the GPU work of its step; what the step did on the host during the capture
    (host tensors such as an optimizer's step counts) happened once. Code that keeps host state per
    step calls this after doing that work; outside a capture it does nothing."""
    if _host_work is not None:
        _host_work.append(work)


@contextlib.contextmanager
def recording_host_work() -> Iterator[List[Callable[[], None]]]:
    """Collect what `on_every_replay` registers within (around a capture)."""
    global _host_work
    outer, _host_work = _host_work, []
    try:
        yield _host_work
    finally:
        _host_work = outer


class FixedShapeInput:
    """Tensors of fixed shapes that a batch is copied into, and the model's input built from them.

    Batches must have the example's rows and keys, one value per row for every key but (at most)
    one multi-valued key, and at most `capacity` values of that key. `load` copies a batch (three
    copies: values, lengths, labels); `build` (inside the graph) makes the padded
    KeyedJaggedTensor, the real bag lengths (keys x rows, for the means) and the item ids.
    """

    def __init__(self, example: Batch, multi_key: Optional[str], slack: float = CAPACITY_SLACK) -> None:
        kjt = example.features
        per_key = kjt.length_per_key_or_none()
        if per_key is None:
            raise ValueError("fixed-shape steps need batches whose per-key lengths are known on the host "
                             "(KJTBuilder and the device-resident reader set them)")
        self.keys: List[str] = list(kjt.keys())
        self.rows = kjt.stride()
        self.multi = self.keys.index(multi_key) if multi_key in self.keys else None
        device = kjt.values().device
        singles = (len(self.keys) - (self.multi is not None)) * self.rows
        self.capacity = 0
        if self.multi is not None:
            self.capacity = math.ceil(per_key[self.multi] * (1 + slack)) + 8
        self.values = torch.zeros(singles + self.capacity, dtype=kjt.values().dtype, device=device)
        self.lengths = torch.zeros(len(self.keys) * self.rows, dtype=kjt.lengths().dtype, device=device)
        self.labels = torch.zeros_like(example.labels)
        self.per_key = [self.rows] * len(self.keys)
        if self.multi is not None:
            self.per_key[self.multi] = self.capacity
            self.slots = torch.arange(self.capacity, device=device)
            self.row_index = torch.arange(self.rows, device=device)
            m, after = self.multi * self.rows, (len(self.keys) - self.multi - 1) * self.rows
            self.after_index = torch.arange(after, device=device) + m  # + the batch's count of multi values
        self.item_lo = sum(self.per_key[:self.keys.index("item")]) if "item" in self.keys else None

    def why_not(self, batch: Batch) -> Optional[str]:
        """Why `batch` cannot be copied in (None when it can), from host-side sizes only."""
        kjt = batch.features
        per_key = kjt.length_per_key_or_none()
        if kjt.stride() != self.rows or len(batch.labels) != self.rows:
            return f"{kjt.stride()} rows, not {self.rows}"
        if list(kjt.keys()) != self.keys or per_key is None:
            return "other keys, or per-key lengths not known on the host"
        for j, n in enumerate(per_key):
            if j == self.multi:
                if n > self.capacity:
                    return f"{n} {self.keys[j]} values, over the {self.capacity} the graph holds"
            elif n != self.rows:
                return f"{n} {self.keys[j]} values for {self.rows} rows"
        return None

    def load(self, batch: Batch) -> None:
        kjt = batch.features
        values = kjt.values()
        self.values[:len(values)].copy_(values, non_blocking=True)
        self.lengths.copy_(kjt.lengths(), non_blocking=True)
        self.labels.copy_(batch.labels, non_blocking=True)

    def build(self) -> Tuple[KeyedJaggedTensor, torch.Tensor, torch.Tensor]:
        """(padded features, real lengths as keys x rows, item id per row) of the loaded batch."""
        rows, lengths, values = self.rows, self.lengths, self.values
        if self.multi is not None:
            m = self.multi * rows
            real = lengths[m:m + rows].long()
            ends = real.cumsum(0)
            total = ends[-1]
            # padding spread over the rows: row r gets extra[r] more values (the extras sum to the
            # slots the batch leaves free; 0 or 1 each while they are fewer than the rows)
            free, r = self.capacity - total, self.row_index
            extra = torch.div((r + 1) * free, rows, rounding_mode="floor") - torch.div(r * free, rows,
                                                                                        rounding_mode="floor")
            before = extra.cumsum(0) - extra  # padding slots ahead of each row's values
            # the real value in slot i belongs to row searchsorted(ends, i); slots past the count go to a spare slot
            owner = torch.searchsorted(ends, self.slots, right=True)
            target = torch.where(owner < rows, self.slots + before[owner.clamp(max=rows - 1)], self.capacity)
            multi = values.new_zeros(self.capacity + 1).scatter_(0, target, values[m:m + self.capacity])
            after = values[self.after_index + total]
            values = torch.cat([values[:m], multi[:self.capacity], after])
            lengths = torch.cat([lengths[:m], (real + extra).to(lengths.dtype), lengths[m + rows:]])
        features = KeyedJaggedTensor(keys=self.keys, values=values, lengths=lengths, stride=rows,
                                     length_per_key=list(self.per_key),
                                     offset_per_key=[0, *itertools.accumulate(self.per_key)])
        items = values[self.item_lo:self.item_lo + rows] if self.item_lo is not None else values[:0]
        return features, self.lengths.view(len(self.keys), rows), items


class GraphedTrainingStep:
    """One training step (forward, loss, backward, optimizer step) on a `FixedShapeInput`:
    captured as a CUDA graph after `warmup` eager steps and replayed from then on. Without
    `capture` (CPU) every step runs eagerly on the same fixed-shape input, which is how the
    padding is tested where there is no GPU.

    `loss_fn(user, item, items, labels)` returns the loss; `optimizer` steps every parameter
    (TorchRec's fused embedding optimizers step inside the backward pass); `padding` are the views
    that `twotower_lit.sharded.ShardedParts.zero_rows` returns. Call `why_not` first: `__call__`
    takes only batches it accepts.
    Counts: ``eager_steps`` (warm-up, and every step without capture) and ``replays``."""

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn, optimizer: torch.optim.Optimizer, example: Batch,
                 multi_key: Optional[str], padding: Sequence[torch.Tensor], capture: bool = True,
                 warmup: int = WARMUP_STEPS) -> None:
        self.model, self.loss_fn, self.optimizer = model, loss_fn, optimizer
        self.input = FixedShapeInput(example, multi_key)
        self.padding = list(padding)
        self.capture, self.warmup = capture, warmup
        self.eager_steps = self.replays = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.loss: Optional[torch.Tensor] = None
        self.host_work: List[Callable[[], None]] = []
        with torch.no_grad():
            for row in self.padding:
                row.zero_()
        if capture:
            # the dense optimizers' step counts and rates stay on the GPU, where the graph updates them
            for group in optimizer.param_groups:
                if "capturable" in group:
                    group["capturable"] = True
            self.stream = capture_stream(self.input.labels.device)

    def why_not(self, batch: Batch) -> Optional[str]:
        return self.input.why_not(batch)

    def _body(self) -> torch.Tensor:
        features, bag_lengths, items = self.input.build()
        user, item = self.model(features, bag_lengths=bag_lengths)
        loss = self.loss_fn(user, item, items, self.input.labels)
        loss.backward()
        self.optimizer.step()
        with torch.no_grad():
            for row in self.padding:
                row.zero_()
        return loss.detach()

    def __call__(self, batch: Batch) -> torch.Tensor:
        """Train on `batch`; returns its loss (a tensor of its own: the graph's is overwritten by the next replay)."""
        self.input.load(batch)
        if not self.capture:
            self.optimizer.zero_grad()
            self.eager_steps += 1
            return self._body()
        if self.graph is None:
            current = torch.cuda.current_stream()
            self.stream.wait_stream(current)
            with torch.cuda.stream(self.stream):
                if self.eager_steps < self.warmup:
                    self.optimizer.zero_grad(set_to_none=True)
                    loss = self._body()
                    self.eager_steps += 1
                    current.wait_stream(self.stream)
                    return loss
            # gradients unset: the captured backward pass writes them into the graph's own memory
            self.optimizer.zero_grad(set_to_none=True)
            graph = torch.cuda.CUDAGraph()
            # thread_local: other threads may call CUDA while this one captures (the loader's
            # pin-memory thread allocates and queries events; NCCL's watchdog queries its events),
            # which the default "global" mode counts as an error in the capture
            with recording_host_work() as self.host_work, \
                    torch.cuda.graph(graph, stream=self.stream, capture_error_mode="thread_local"):
                self.loss = self._body()
            self.graph = graph  # the capture recorded the step (its host work is done); the replay below runs it
        else:
            for work in self.host_work:
                work()
        self.graph.replay()
        self.replays += 1
        return self.loss.clone()

    def report(self) -> Dict[str, int]:
        return {"replays": self.replays, "eager_steps": self.eager_steps,
                "multi_valued_capacity": self.input.capacity}
