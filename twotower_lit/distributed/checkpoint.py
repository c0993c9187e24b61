"""The files of a training checkpoint directory, and how they are written and read back.

A checkpoint written by `TorchRecStrategy` holds DCP's shards (``__<rank>_<n>.distcp``) and
``.metadata``, the trainer state (Lightning's loop, callback and data-module state:
`TRAINER_STATE_FILE`) and, written last, `MANIFEST_FILE`: the size and SHA-256 of every other
file. A directory without a manifest was not completely written. A checkpoint directory may come
from elsewhere (synced from S3), so reading one verifies every file against the manifest first
and never unpickles anything outside an allow-list: the trainer state and DCP's byte items go
through torch's ``weights_only`` loader, ``.metadata`` through an allow-list of DCP's metadata
classes. The manifest guards against damage and partial copies; the allow-lists against a
directory crafted to run code, whose manifest would match it.
"""
from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from twotower_lit.data.storage import sha256_file

TRAINER_STATE_FILE = "trainer_state.pt"
MANIFEST_FILE = "checksums.json"
DCP_METADATA_FILE = ".metadata"
MANIFEST_FORMAT = 1
_MANIFEST_TMP = MANIFEST_FILE + ".tmp"

START_ANEW = ("resume from another checkpoint (--resume auto takes the newest intact one) or start a new run "
              "in another --output-dir")


class CheckpointError(ValueError):
    """A checkpoint directory that must not be loaded: incomplete, damaged, altered, or of a format
    that cannot be read safely. The message names the file and what to do."""


# ------------------------------------------------------------------ checksums
def checkpoint_entries(path: Path) -> List[str]:
    """The names in checkpoint directory `path` that its manifest must cover (all but the manifest)."""
    return sorted(name for name in os.listdir(path) if name not in (MANIFEST_FILE, _MANIFEST_TMP))


def hash_files(path: Path, names: Iterable[str]) -> Dict[str, Dict[str, Any]]:
    """``{name: {"bytes": size, "sha256": hex}}`` for the files `names` of directory `path`."""
    return {name: {"bytes": (path / name).stat().st_size, "sha256": sha256_file(str(path / name))} for name in names}


def write_manifest(path: Path, files: Dict[str, Dict[str, Any]]) -> None:
    """Write the manifest of `files` (from `hash_files`) into `path`, atomically: a reader sees
    either no manifest or the whole one."""
    tmp = path / _MANIFEST_TMP
    with open(tmp, "w") as f:
        json.dump({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path / MANIFEST_FILE)


def read_manifest(path: Path) -> Dict[str, Dict[str, Any]]:
    """The manifest's ``files`` of checkpoint directory `path`, checked for form."""
    manifest = path / MANIFEST_FILE
    if not manifest.is_file():
        raise CheckpointError(
            f"{path} has no {MANIFEST_FILE}: it was not completely written (the job stopped while saving it), "
            f"or it was written by an older version of twotower_lit, whose checkpoints carry no checksums and "
            f"cannot be read safely; {START_ANEW}")
    try:
        with open(manifest) as f:
            content = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{manifest} is not a valid checkpoint manifest ({e}); {START_ANEW}") from None
    form = (content.get("format"), content.get("algorithm")) if isinstance(content, dict) else None
    if form != (MANIFEST_FORMAT, "sha256"):
        raise CheckpointError(f"{manifest} is not a checkpoint manifest of format {MANIFEST_FORMAT} with sha256 "
                              f"digests (a newer version of twotower_lit, or another file); {START_ANEW}")
    files = content.get("files")
    ok = isinstance(files, dict) and all(
        isinstance(name, str) and isinstance(entry, dict) and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("bytes"), int) for name, entry in files.items())
    if not ok:
        raise CheckpointError(f"{manifest} is not a valid checkpoint manifest (its 'files' must map each file "
                              f"name to its 'bytes' and 'sha256'); {START_ANEW}")
    return files


# directories verified by this process, each with the sizes and times its files had then: the same
# checkpoint is read by `--resume auto`'s choice and then by the strategy's load
_verified: Dict[str, Tuple] = {}


def _signature(path: Path, names: Iterable[str]) -> Tuple:
    stats = [(name, (path / name).stat()) for name in [MANIFEST_FILE, *names]]
    return tuple((name, st.st_size, st.st_mtime_ns) for name, st in stats)


def verify_checkpoint(path: Path, names: Optional[Iterable[str]] = None) -> None:
    """Check that checkpoint directory `path` holds exactly the files of its manifest, each of
    its size and SHA-256 (only `names` of them, if given). Raises `CheckpointError` naming the
    first file that differs."""
    path = Path(path)
    files = read_manifest(path)
    present = set(checkpoint_entries(path))
    missing = sorted((set(files) | {TRAINER_STATE_FILE, DCP_METADATA_FILE}) - present)
    extra = sorted(present - set(files))
    if missing:
        raise CheckpointError(f"{path} is incomplete: {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                              f"missing; {START_ANEW}")
    if extra:
        raise CheckpointError(f"{path} holds {', '.join(extra)}, which its {MANIFEST_FILE} does not list (a file "
                              f"added after the checkpoint was written); remove it if you know where it came "
                              f"from, or {START_ANEW}")
    names = sorted(files) if names is None else sorted(names)
    key = str(path.resolve())
    signature = _signature(path, names)
    if _verified.get(key) == signature:
        return
    for name in names:
        entry, file = files[name], path / name
        if not file.is_file():
            raise CheckpointError(f"{file} is not a file; {START_ANEW}")
        size = file.stat().st_size
        if size != entry["bytes"]:
            raise CheckpointError(f"{file} has {size} bytes, its checkpoint's {MANIFEST_FILE} says {entry['bytes']}: "
                                  f"it was damaged or altered after it was written; {START_ANEW}")
        digest = sha256_file(str(file))
        if digest != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its checkpoint's {MANIFEST_FILE} (SHA-256 {digest}, "
                                  f"expected {entry['sha256']}): it was damaged or altered after it was written; "
                                  f"{START_ANEW}")
    if set(names) == set(files):
        _verified[key] = signature


# ------------------------------------------------------------------ trainer state
def encode_trainer_state(state: Dict[str, Any]) -> bytes:
    """`state` (Lightning's checkpoint dict without the sharded tensors) as `torch.save` bytes that
    `decode_trainer_state` reads back: refused here, at save time, if it holds an object that only
    a full unpickler could rebuild, rather than at resume."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    try:
        torch.load(io.BytesIO(buffer.getvalue()), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise TypeError(f"the trainer state holds an object other than tensors and plain Python values, which "
                        f"a resume could not load safely: {_weights_only_reason(e)}. Keep callback and hyperparameter "
                        f"state to tensors, numbers, strings, lists and dicts") from None
    return buffer.getvalue()


def decode_trainer_state(data: bytes, where: Path) -> Dict[str, Any]:
    """The trainer state saved in `where` (its bytes `data`), loaded without running code from it."""
    if not zipfile.is_zipfile(io.BytesIO(data)):  # torch.save writes a zip archive
        raise CheckpointError(f"{where} cannot be read: it is not a file written by torch.save (truncated or "
                              f"garbled); {START_ANEW}")
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{where} was refused: it holds objects that only a full unpickler can rebuild, and unpickling runs "
            f"code the file names ({_weights_only_reason(e)}). Checkpoints of older versions of twotower_lit were "
            f"written in that unsafe format, and a crafted file looks the same; {START_ANEW}") from None
    except Exception as e:  # a damaged archive: torch raises RuntimeError, EOFError, ...
        raise CheckpointError(f"{where} cannot be read ({type(e).__name__}: {_first_line(e)}); {START_ANEW}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{where} holds a {type(state).__name__}, not a trainer state; {START_ANEW}")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0][:300] if text else type(error).__name__


_TORCH_ADVICE = ("Weights only load failed", "Check the documentation", "Please file an issue",
                 "WeightsUnpickler error")


def _weights_only_reason(error: BaseException) -> str:
    """The line of torch's weights_only refusal that says what was refused (it surrounds it with advice)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    specific = [line for line in lines if not line.startswith(_TORCH_ADVICE)]
    return (specific or lines or [type(error).__name__])[0][:300]


def read_trainer_state(path: Path) -> Dict[str, Any]:
    """The trainer state of checkpoint directory `path`, its file verified against the manifest
    (the shards are verified by `read_checkpoint`)."""
    path = Path(path)
    verify_checkpoint(path, [TRAINER_STATE_FILE])
    file = path / TRAINER_STATE_FILE
    return decode_trainer_state(file.read_bytes(), file)


def read_checkpoint(path: Path) -> Dict[str, Any]:
    """Verify every file of checkpoint directory `path`, check that DCP's ``.metadata`` reads
    within the allow-list, and return the trainer state."""
    path = Path(path)
    verify_checkpoint(path)
    read_dcp_metadata(path / DCP_METADATA_FILE)
    file = path / TRAINER_STATE_FILE
    return decode_trainer_state(file.read_bytes(), file)


def is_checkpoint_dir(path: Path) -> bool:
    """Whether `path` looks like a checkpoint directory (complete or not)."""
    return path.is_dir() and any((path / name).exists()
                                 for name in (MANIFEST_FILE, TRAINER_STATE_FILE, DCP_METADATA_FILE))


def newest_intact_checkpoint(checkpoint_dir: str,
                             report: Callable[[str], None] = print) -> Optional[Path]:
    """The checkpoint under `checkpoint_dir` with the highest global step (then the newest)
    that verifies and reads (`read_checkpoint`), or None if there is no checkpoint at all.

    Each checkpoint passed over that might be newer than the one taken (a higher step, or one
    whose trainer state cannot be read) is reported through `report` with the reason, and so is
    the fallback. Raises `CheckpointError` if there are checkpoints but none of them is intact."""
    root = Path(checkpoint_dir)
    candidates = sorted(p for p in root.iterdir() if is_checkpoint_dir(p)) if root.is_dir() else []
    refused: List[Tuple[Path, str]] = []
    ordered = []
    for path in candidates:
        try:
            state = read_trainer_state(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        ordered.append((int(state.get("global_step", 0)), path.stat().st_mtime, path))
    chosen = None
    for step, _, path in sorted(ordered, reverse=True):
        try:
            read_checkpoint(path)
        except CheckpointError as e:
            refused.append((path, str(e)))
            continue
        chosen = (step, path)
        break
    if not candidates:
        return None
    if chosen is None:
        details = "\n".join(f"  {_without_advice(reason)}" for _, reason in refused)
        raise CheckpointError(f"--resume auto: no intact checkpoint in {root}:\n{details}\nStart a new run in another "
                              f"--output-dir (or --checkpoint-dir), or remove the damaged checkpoints")
    for path, reason in refused:
        report(f"--resume auto: passing over {path.name}: {_without_advice(reason)}")
    if refused:
        report(f"--resume auto: resuming from {chosen[1]} (step {chosen[0]}), the newest intact checkpoint")
    return chosen[1]


def _without_advice(reason: str) -> str:
    return reason.replace(f"; {START_ANEW}", "")


# ------------------------------------------------------------------ DCP, read without running code
def _allowed_globals() -> Dict[Tuple[str, str], Any]:
    """What DCP's ``.metadata`` pickle may name: its metadata dataclasses, torch's size, dtypes
    and layouts, and the path DCP records (constructing any of them runs no code of the file's)."""
    import pathlib

    from torch.distributed.checkpoint import filesystem, metadata
    from torch.serialization import _get_layout

    allowed: Dict[Tuple[str, str], Any] = {}
    for name in ("Metadata", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
                 "TensorProperties", "MetadataIndex", "_MEM_FORMAT_ENCODING"):
        if hasattr(metadata, name):
            allowed[("torch.distributed.checkpoint.metadata", name)] = getattr(metadata, name)
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = filesystem._StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed[("torch.serialization", "_get_layout")] = _get_layout
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    for module in ("pathlib", "pathlib._local"):  # (Python 3.13 moved the classes)
        for name in ("PosixPath", "PurePosixPath"):
            allowed[(module, name)] = getattr(pathlib, name)
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            allowed[("torch", name)] = value
    return allowed


class _AllowListUnpickler(pickle.Unpickler):
    allowed: Dict[Tuple[str, str], Any] = {}

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"{module}.{name} is not a DCP metadata class") from None


def read_dcp_metadata(file: Path) -> Metadata:
    """DCP's ``.metadata`` of a checkpoint, unpickled through an allow-list of DCP's metadata
    classes; refuses a file naming anything else, and shard names outside the directory."""
    if not _AllowListUnpickler.allowed:
        _AllowListUnpickler.allowed = _allowed_globals()
    try:
        with open(file, "rb") as f:
            metadata = _AllowListUnpickler(f).load()
    except FileNotFoundError:
        raise CheckpointError(f"{file} is missing; {START_ANEW}") from None
    except Exception as e:
        raise CheckpointError(f"{file} was refused: it is not DCP metadata made of DCP's own classes ("
                              f"{type(e).__name__}: {_first_line(e)}), and reading it any other way could run code "
                              f"it names; {START_ANEW}") from None
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"{file} holds a {type(metadata).__name__}, not DCP metadata; {START_ANEW}")
    for info in (metadata.storage_data or {}).values():
        name = getattr(info, "relative_path", None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise CheckpointError(f"{file} names shard {name!r}, which is not a file of its directory; {START_ANEW}")
    return metadata


class AllowListFileSystemReader(FileSystemReader):
    """DCP's file reader, with ``.metadata`` read by `read_dcp_metadata` instead of `pickle.load`."""

    def read_metadata(self) -> Metadata:  # (no rank argument: DCP then tries no per-rank metadata)
        metadata = read_dcp_metadata(Path(self.path) / DCP_METADATA_FILE)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class WeightsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with the checkpoint's byte items (non-tensor values, such as
    an optimizer's hyperparameters) loaded by torch's ``weights_only`` loader: the default one
    unpickles them with ``weights_only=False``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            item = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"checkpoint item {read_item.dest_index.fqn!r} was refused: it holds objects that "
                                  f"only a full unpickler can rebuild ({_weights_only_reason(e)}); "
                                  f"{START_ANEW}") from None
        vetted = io.BytesIO()  # the base class loads it again: give it what was just read safely
        torch.save(item, vetted)
        vetted.seek(0)
        super().load_bytes(read_item, vetted)

