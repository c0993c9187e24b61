"""TorchRecStrategy pieces that need no process group."""
import lightning as L

from twotower_lit.strategy import throttle_sigterm_broadcast


def test_sigterm_broadcast_runs_every_n_steps_on_every_rank_alike():
    loop = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False).fit_loop.epoch_loop
    calls = []
    loop._broadcast_sigterm_tensor = lambda: calls.append(loop.total_batch_idx)
    throttle_sigterm_broadcast(loop, 10)
    throttle_sigterm_broadcast(loop, 10)  # idempotent: a second fit does not stack throttles
    for _ in range(35):  # Lightning calls it before each step, then counts the step as ready
        loop._broadcast_sigterm_tensor()
        loop.batch_progress.increment_ready()
    # a pure function of the step count, the same on every rank: steps 0, 10, 20, 30
    assert calls == [-1, 9, 19, 29]

