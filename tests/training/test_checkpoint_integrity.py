"""Checkpoints are verified and read without running code from them: a checksum manifest written
last, trainer state and DCP metadata read through allow-lists, and `--resume auto` passing over a
damaged checkpoint to the newest intact one. The checkpoints are those of a real short training run."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.training.conftest import REPO, read_json, run_cli

ARGS = ["--batch-size", "256", "--progress", "false", "--negatives", "0", "--mlflow-uri", "none"]


@pytest.fixture(scope="module")
def tiny_prepared(synthetic_movielens, tmp_path_factory) -> Path:
    from twotower_lit.config import PrepareConfig
    from twotower_lit.data.prepare import prepare_dataset

    out = tmp_path_factory.mktemp("prepared") / "ml-1m-3k"
    prepare_dataset(PrepareConfig(data_dir=str(synthetic_movielens("ml-1m", 3000, seed=0)), min_shards=4), str(out),
                    log=lambda *a, **k: None)
    return out


@pytest.fixture(scope="module")
def reference(tiny_prepared, tmp_path_factory) -> Path:
    """An uninterrupted run: 2 epochs of 10 steps, a checkpoint every 3 steps and at each epoch's end."""
    out = tmp_path_factory.mktemp("reference") / "out"
    run_cli("entrypoints.train", ["--data-dir", str(tiny_prepared), "--output-dir", str(out), "--max-epochs", "2",
                                  "--checkpoint-every-n-steps", "3", *ARGS])
    return out


def first_epoch_checkpoints(reference: Path, tmp_path: Path) -> Path:
    """A copy of the reference's first-epoch checkpoints (steps 3, 6, 9 and the epoch's end, 10):
    the checkpoint folder of a job stopped during its second epoch."""
    ckpts = tmp_path / "out" / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("epoch0-step3.ckpt", "epoch0-step6.ckpt", "epoch0-step9.ckpt", "epoch0-end-step10.ckpt"):
        shutil.copytree(reference / "checkpoints" / name, ckpts / name)
    return ckpts


def reseal(checkpoint: Path) -> None:
    """Rewrite the checkpoint's checksum manifest to match its files, as someone who altered them could."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
             for p in checkpoint.iterdir() if p.name != "checksums.json"}
    (checkpoint / "checksums.json").write_text(json.dumps({"format": 1, "algorithm": "sha256", "files": files}))


class RunsACommand:
    """Unpickling this runs a shell command (it creates the marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def train_cli(data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.train", "--data-dir", str(data), "--output-dir", str(out),
                           "--max-epochs", "2", "--checkpoint-every-n-steps", "3", *ARGS, *extra],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                          timeout=600)


def test_every_checkpoint_carries_a_manifest_of_all_its_files(reference):
    checkpoints = sorted((reference / "checkpoints").iterdir())
    assert len(checkpoints) == 8
    for ckpt in checkpoints:
        manifest = json.loads((ckpt / "checksums.json").read_text())
        on_disk = {p.name for p in ckpt.iterdir()} - {"checksums.json"}
        assert set(manifest["files"]) == on_disk and {".metadata", "trainer_state.pt", "__0_0.distcp"} <= on_disk
        for name, entry in manifest["files"].items():
            data = (ckpt / name).read_bytes()
            assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}, name


def test_resume_auto_passes_over_a_corrupt_newest_checkpoint_and_resumes_from_the_one_before(
        reference, tiny_prepared, tmp_path):
    ckpts = first_epoch_checkpoints(reference, tmp_path)
    state = ckpts / "epoch0-end-step10.ckpt" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:700])  # a truncated copy
    proc = run_cli("entrypoints.train", ["--data-dir", str(tiny_prepared), "--output-dir", str(tmp_path / "out"),
                                         "--max-epochs", "2", "--checkpoint-every-n-steps", "3", *ARGS,
                                         "--resume", "auto"])
    assert f"--resume auto: passing over epoch0-end-step10.ckpt: {state} has 700 bytes" in proc.stdout, proc.stdout
    assert f"--resume auto: resuming from {ckpts / 'epoch0-step9.ckpt'} (step 9), the newest intact checkpoint" \
        in proc.stdout
    # it trained steps 10 to 20 from step 9's state: the uninterrupted run's result
    resumed, full = read_json(tmp_path / "out" / "metrics.json"), read_json(reference / "metrics.json")
    assert resumed["train"]["steps"] == full["train"]["steps"] == 20
    assert resumed["test"] == pytest.approx(full["test"], abs=1e-6)


def test_a_trainer_state_that_would_run_a_command_is_refused_and_the_command_never_runs(
        reference, tiny_prepared, tmp_path):
    ckpts = first_epoch_checkpoints(reference, tmp_path)
    marker = tmp_path / "pwned"
    planted = ckpts / "epoch0-end-step10.ckpt"
    torch.save({"global_step": 10, "epoch": 1, "loops": RunsACommand(marker)}, planted / "trainer_state.pt")
    reseal(planted)  # the manifest matches: only the loader stands between the file and the command

    from twotower_lit.training.job import latest_checkpoint

    chosen = latest_checkpoint(str(ckpts))
    assert not marker.exists()
    assert chosen == str(ckpts / "epoch0-step9.ckpt")
    # named on --resume PATH, the job stops before training, naming the file and why
    proc = train_cli(tiny_prepared, tmp_path / "out", "--resume", str(planted))
    assert proc.returncode != 0 and not marker.exists()
    assert f"{planted / 'trainer_state.pt'} was refused: it holds objects that only a full unpickler can rebuild, " \
           f"and unpickling runs code the file names (Trying to load unsupported GLOBAL posix.system" \
        in proc.stderr, proc.stderr[-3000:]
    assert "older versions of twotower_lit" in proc.stderr
    # the strategy's own load refuses it too
    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.distributed import TorchRecStrategy

    with pytest.raises(CheckpointError, match="was refused"):
        TorchRecStrategy().load_checkpoint(str(planted))
    assert not marker.exists()
    torch.load(planted / "trainer_state.pt", weights_only=False)  # (the file does run the command when unpickled)
    assert marker.exists()


def test_a_checkpoint_of_the_older_format_without_a_manifest_is_refused_naming_why(reference, tmp_path):
    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.distributed import TorchRecStrategy
    from twotower_lit.distributed.checkpointing import replicated_tables_of

    ckpt = tmp_path / "epoch0-step9.ckpt"
    shutil.copytree(reference / "checkpoints" / ckpt.name, ckpt)
    (ckpt / "checksums.json").unlink()  # as written before checkpoints carried one, or by a job stopped mid-save
    for load in (replicated_tables_of, TorchRecStrategy().load_checkpoint):
        with pytest.raises(CheckpointError, match=r"has no checksums.json: it was not completely written .* or it was "
                                                  r"written by an older version of twotower_lit"):
            load(str(ckpt))


def test_dcp_metadata_that_would_run_a_command_is_refused(reference, tmp_path):
    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.distributed import TorchRecStrategy

    ckpt = tmp_path / "epoch0-step9.ckpt"
    shutil.copytree(reference / "checkpoints" / ckpt.name, ckpt)
    marker = tmp_path / "pwned"
    (ckpt / ".metadata").write_bytes(pickle.dumps(RunsACommand(marker)))
    reseal(ckpt)
    with pytest.raises(CheckpointError, match=r"\.metadata was refused: it is not DCP metadata made of DCP's own "
                                              r"classes \(UnpicklingError: posix.system is not"):
        TorchRecStrategy().load_checkpoint(str(ckpt))
    assert not marker.exists()
    import torch.distributed.checkpoint as dcp

    with pytest.raises(dcp.CheckpointException):  # (DCP's own reader unpickles it: the command runs)
        dcp.load({}, checkpoint_id=str(ckpt))
    assert marker.exists()


def test_dcp_byte_items_are_read_weights_only(tmp_path):
    """A non-tensor value in DCP's shards (torch pickles it) is read with torch's weights_only
    loader, not with DCP's default full unpickler."""
    import torch.distributed.checkpoint as dcp

    from twotower_lit.distributed.checkpoint import AllowListFileSystemReader, WeightsOnlyLoadPlanner

    marker = tmp_path / "pwned"
    good = tmp_path / "good"
    dcp.save({"w": torch.arange(4.0), "hparams": {"lr": 0.5, "betas": (0.9, 0.99)}}, checkpoint_id=str(good),
             no_dist=True)
    target = {"w": torch.zeros(4), "hparams": {"lr": None, "betas": None}}
    dcp.load(target, checkpoint_id=str(good), storage_reader=AllowListFileSystemReader(str(good)),
             planner=WeightsOnlyLoadPlanner(), no_dist=True)
    assert torch.equal(target["w"], torch.arange(4.0)) and target["hparams"] == {"lr": 0.5, "betas": (0.9, 0.99)}

    bad = tmp_path / "bad"
    dcp.save({"w": torch.arange(4.0), "hparams": RunsACommand(marker)}, checkpoint_id=str(bad), no_dist=True)
    with pytest.raises(dcp.CheckpointException, match="'hparams' was refused"):
        dcp.load({"w": torch.zeros(4), "hparams": None}, checkpoint_id=str(bad),
                 storage_reader=AllowListFileSystemReader(str(bad)), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    assert not marker.exists()
    dcp.load({"w": torch.zeros(4), "hparams": None}, checkpoint_id=str(bad), no_dist=True)  # (DCP's default planner)
    assert marker.exists()


def test_flipped_bytes_in_a_shard_are_refused_on_resume_naming_the_file(reference, tiny_prepared, tmp_path):
    ckpts = first_epoch_checkpoints(reference, tmp_path)
    shard = ckpts / "epoch0-step9.ckpt" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 4000):  # inside the tensors: the file still loads as one
        data[i] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = train_cli(tiny_prepared, tmp_path / "out", "--resume", str(shard.parent))
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"{shard} does not match its checkpoint's checksums.json (SHA-256 " in proc.stderr, proc.stderr[-3000:]
    assert "--resume auto takes the newest intact one" in proc.stderr
    assert not (tmp_path / "out" / "metrics.json").exists()


@pytest.mark.parametrize("change", ["missing", "extra", "resized", "manifest"])
def test_a_checkpoint_with_a_missing_extra_or_resized_file_or_a_garbled_manifest_is_refused(reference, tmp_path,
                                                                                            change):
    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.distributed import TorchRecStrategy

    ckpt = tmp_path / "epoch0-step9.ckpt"
    shutil.copytree(reference / "checkpoints" / ckpt.name, ckpt)
    if change == "missing":
        (ckpt / "__0_0.distcp").unlink()
        expected = r"is incomplete: __0_0.distcp is missing"
    elif change == "extra":
        (ckpt / "__1_0.distcp").write_bytes(b"\0" * 16)
        expected = r"holds __1_0.distcp, which its checksums.json does not list"
    elif change == "resized":
        with open(ckpt / "__0_0.distcp", "ab") as f:
            f.write(b"\0")
        expected = r"__0_0.distcp has \d+ bytes, its checkpoint's checksums.json says \d+"
    else:
        (ckpt / "checksums.json").write_text('{"files": {"__0_0.distcp": ')
        expected = r"checksums.json is not a valid checkpoint manifest \(Expecting value: line 1"
    with pytest.raises(CheckpointError, match=expected):
        TorchRecStrategy().load_checkpoint(str(ckpt))


def test_resume_auto_with_no_intact_checkpoint_is_a_clear_error_and_an_unreadable_state_is_named(
        reference, tmp_path):
    from twotower_lit.distributed.checkpoint import CheckpointError
    from twotower_lit.training.job import latest_checkpoint

    ckpts = first_epoch_checkpoints(reference, tmp_path)
    assert latest_checkpoint(str(ckpts)) == str(ckpts / "epoch0-end-step10.ckpt")  # intact: the newest
    garbled = ckpts / "epoch0-end-step10.ckpt"
    (garbled / "trainer_state.pt").write_bytes(b"not a torch file")
    reseal(garbled)  # checksums match: the file itself cannot be read
    lines = []
    from twotower_lit.distributed.checkpoint import newest_intact_checkpoint

    assert newest_intact_checkpoint(str(ckpts), report=lines.append) == ckpts / "epoch0-step9.ckpt"
    assert lines[0].startswith(f"--resume auto: passing over epoch0-end-step10.ckpt: {garbled / 'trainer_state.pt'} "
                               f"cannot be read: it is not a file written by torch.save")
    assert lines[1] == (f"--resume auto: resuming from {ckpts / 'epoch0-step9.ckpt'} (step 9), the newest intact "
                        f"checkpoint")
    for ckpt in ckpts.iterdir():
        (ckpt / "checksums.json").unlink()
    with pytest.raises(CheckpointError) as refused:
        latest_checkpoint(str(ckpts))
    assert str(refused.value).splitlines() == [
        f"--resume auto: no intact checkpoint in {ckpts}:",
        *(f"  {ckpts / name} has no checksums.json: it was not completely written (the job stopped while saving it), "
          f"or it was written by an older version of twotower_lit, whose checkpoints carry no checksums and cannot "
          f"be read safely" for name in ("epoch0-end-step10.ckpt", "epoch0-step3.ckpt", "epoch0-step6.ckpt",
                                          "epoch0-step9.ckpt")),
        "Start a new run in another --output-dir (or --checkpoint-dir), or remove the damaged checkpoints"]
    assert latest_checkpoint(str(tmp_path / "empty")) is None  # nothing there: a fresh start, as before


def test_a_trainer_state_that_a_resume_could_not_read_safely_is_refused_when_saved():
    from twotower_lit.distributed.checkpoint import decode_trainer_state, encode_trainer_state

    state = {"global_step": 3, "callbacks": {"x": {"best": torch.tensor(float("inf")), "path": "a"}},
             "loops": {"fit_loop": {"epoch_progress": {"total": {"completed": 1}}}}, "dm": {"rows": [1, 2]}}
    back = decode_trainer_state(encode_trainer_state(state), Path("state"))
    assert back["callbacks"]["x"]["best"].item() == float("inf") and back["loops"] == state["loops"]
    with pytest.raises(TypeError, match="the trainer state holds an object other than tensors and plain Python"):
        encode_trainer_state({"hparams": Path("/tmp")})


def test_two_ranks_write_one_manifest_of_both_ranks_shards_and_refuse_a_damaged_one_together(tiny_prepared, tmp_path):
    """Each rank writes its own shards; the manifest lists them all. A damaged shard of rank 1
    is refused on every rank alike (no rank goes on into DCP's collectives and waits there)."""
    two = ["--accelerator", "cpu", "--devices", "2", "--sharding", "row_wise", "--collective-timeout-s", "60"]
    out = tmp_path / "two"
    run_cli("entrypoints.train", ["--data-dir", str(tiny_prepared), "--output-dir", str(out), "--max-epochs", "1",
                                  "--checkpoint-every-n-steps", "3", *ARGS, *two])
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert len(checkpoints) == 2
    for ckpt in checkpoints:
        listed = set(json.loads((ckpt / "checksums.json").read_text())["files"])
        assert listed == {p.name for p in ckpt.iterdir()} - {"checksums.json"}
        assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "trainer_state.pt"} <= listed
    shard = next(c for c in checkpoints if "-end-" in c.name) / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    proc = train_cli(tiny_prepared, tmp_path / "resumed", *two, "--resume", str(shard.parent))
    assert proc.returncode != 0, proc.stdout[-2000:]
    assert f"{shard} does not match its checkpoint's checksums.json" in proc.stderr, proc.stderr[-3000:]
    assert "lost contact with another rank" not in proc.stderr
