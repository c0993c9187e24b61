"""The exported model directory and its loader. Needs only torch, numpy and safetensors.

Layout of ``MODEL_DIR``::

    model.safetensors   user tower: ``user.emb.<feature>`` tables and ``user.mlp.*`` layers;
                        ``item.vectors`` [I, d]: item-tower output of every real item (row j is
                        item index j + 1; the out-of-vocabulary row is not exported);
                        ``user.features`` [U + 1, F]: feature indices of every known user;
                        ``item.popularity`` [I]: training positives per item (fallback ranking);
                        ``seen.indptr`` / ``seen.items``: each user's training items (CSR).
    config.json         format version, model version, feature names, sizes, tower layers
    users.json          raw user id of every user index (index 0: unknown)
    items.json          raw id, title and genre names of every real item, in index order
    vocab.json          categorical vocabularies (for cold-start users' raw features)
    metrics.json        the training run's metrics
    index.json, index-<name>.faiss
                        optional search indexes over the item vectors, added after export
                        (`twotower_lit.export.index`); listed in the manifest like the rest
    manifest.json       sha256 of every other file; the loader reads only files listed here whose
                        bytes match (the set it needs comes from this format, not from the manifest)

score(user, item) = <user tower(user features), item vector>: the logit the model was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from typing import Dict, List, Mapping, Sequence

import torch
import torch.nn as nn
from safetensors.torch import load as load_tensors

from twotower_lit.layers import mlp

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
USERS = "users.json"
ITEMS = "items.json"
VOCAB = "vocab.json"
METRICS = "metrics.json"
MANIFEST = "manifest.json"
FILES = (WEIGHTS, CONFIG, USERS, ITEMS, VOCAB, METRICS)


class ArtifactError(ValueError):
    """The model directory is incomplete, corrupted or of an unknown format."""


class UserTower(nn.Module):
    """The user (query) tower without TorchRec: one `nn.Embedding` per single-valued user feature
    (sum pooling of one id is a lookup), concatenated in training order, then the MLP."""

    def __init__(self, feature_rows: Mapping[str, int], embedding_dim: int, layers: Sequence[int]) -> None:
        super().__init__()
        self.feature_names = list(feature_rows)
        self.emb = nn.ModuleDict({n: nn.Embedding(rows, embedding_dim) for n, rows in feature_rows.items()})
        self.mlp = mlp(embedding_dim * len(feature_rows), layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """`features`: [B, F] int64 indices, columns in `feature_names` order."""
        parts = [self.emb[n](features[:, j]) for j, n in enumerate(self.feature_names)]
        return self.mlp(torch.cat(parts, dim=1))


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclass
class ExportedModel:
    """A loaded model directory: everything serving needs, as tensors and plain Python."""

    config: Dict
    user_tower: UserTower
    user_features: torch.Tensor  # [U + 1, F]
    item_vectors: torch.Tensor  # [I, d]
    popularity: torch.Tensor  # [I]
    seen_indptr: torch.Tensor
    seen_items: torch.Tensor
    user_ids: List[int]  # raw id of each user index
    items: List[Dict]  # {"id", "title", "genres"} per real item
    vocab: Dict[str, List[str]]
    metrics: Dict

    @property
    def model_version(self) -> str:
        return self.config["model_version"]

    @property
    def num_items(self) -> int:
        return int(self.item_vectors.shape[0])

    def user_index(self) -> Dict[int, int]:
        """raw user id -> user index."""
        return {uid: i for i, uid in enumerate(self.user_ids) if i > 0}

    @torch.no_grad()
    def user_vectors(self, features: torch.Tensor) -> torch.Tensor:
        return self.user_tower(features)

    def seen(self, user_index: int) -> torch.Tensor:
        """Item indices (1-based, as in training) the user rated in training."""
        lo, hi = int(self.seen_indptr[user_index]), int(self.seen_indptr[user_index + 1])
        return self.seen_items[lo:hi]

    @property
    def exposure_dims(self) -> int:
        """Last dimensions of the vectors that enter the retrieval score only (see `TwoTower`)."""
        return int(self.config.get("exposure_dims", 0))

    @torch.no_grad()
    def scores(self, user_vectors: torch.Tensor) -> torch.Tensor:
        """[B, I] retrieval scores of every real item (column j is item index j + 1)."""
        return user_vectors @ self.item_vectors.t()


def write_manifest(model_dir: str, model_version: str) -> Dict:
    manifest = {"format_version": FORMAT_VERSION, "model_version": model_version,
                "files": {name: sha256_file(os.path.join(model_dir, name)) for name in FILES}}
    with open(os.path.join(model_dir, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return manifest


def add_to_manifest(model_dir: str, names: Sequence[str]) -> Dict:
    """List more files of `model_dir` (e.g. a search index added after export) in its manifest,
    with their sha256; the manifest is replaced atomically."""
    manifest = read_manifest(model_dir)
    for name in names:
        manifest["files"][name] = sha256_file(os.path.join(model_dir, name))
    tmp = os.path.join(model_dir, MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    os.replace(tmp, os.path.join(model_dir, MANIFEST))
    return manifest


_REEXPORT = "export the model again (python -m entrypoints.train writes OUTPUT/model)"


def read_manifest(model_dir: str) -> Dict:
    """The manifest of a model directory, checked for shape: raises `ArtifactError` naming the
    file and what to do when it is missing, not JSON, of another format version or without the
    checksum of every file the loader reads (`FILES`: the format decides, not the manifest)."""
    path = os.path.join(model_dir, MANIFEST)
    if not os.path.isfile(path):
        raise ArtifactError(f"{model_dir}: no {MANIFEST}; is this a twotower_lit model directory?")
    try:
        with open(path, "rb") as f:
            manifest = json.loads(f.read().decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path}: not valid JSON ({e}); the manifest is corrupted: {_REEXPORT}") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: expected a JSON object, found {type(manifest).__name__}; {_REEXPORT}")
    _check_format_version(manifest, path)
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{path}: no 'files' object with the sha256 of each model file, so nothing can be "
                            f"verified; {_REEXPORT}")
    for name, digest in files.items():
        if name != os.path.basename(name) or name in ("", ".", "..", MANIFEST):
            raise ArtifactError(f"{path}: files lists {name!r}, not a file of the model directory; {_REEXPORT}")
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ArtifactError(f"{path}: files[{name!r}] is {digest!r}, not a sha256 hex digest; {_REEXPORT}")
    unlisted = [name for name in FILES if name not in files]
    if unlisted:
        raise ArtifactError(f"{path}: does not list {', '.join(unlisted)}, which the loader reads; every model file "
                            f"must carry its sha256 here (the manifest was edited or is incomplete): {_REEXPORT}")
    return manifest


def _check_format_version(doc: Dict, path: str) -> None:
    # an integer equal to FORMAT_VERSION: JSON's true or 1.0 compare equal to 1 in Python but were
    # not written by this format
    version = doc.get("format_version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {version!r}, this code reads "
                            f"{FORMAT_VERSION}; export the model again with this version")


def _verified_bytes(model_dir: str, name: str, manifest: Dict) -> bytes:
    """The bytes of one model file, checked against the manifest's sha256. The loader parses these
    very bytes, so a file swapped after the check is never the one loaded."""
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
        raise ArtifactError(f"{path} is missing (listed in {MANIFEST}); {_REEXPORT}")
    with open(path, "rb") as f:
        data = f.read()
    if hashlib.sha256(data).hexdigest() != manifest["files"][name]:
        raise ArtifactError(f"{path}: sha256 does not match {MANIFEST}; the artifact is corrupted or was modified: "
                            f"{_REEXPORT}, or copy it again from where it was written")
    return data


def verify(model_dir: str) -> Dict:
    """Check the manifest and every file it lists; raise `ArtifactError` naming the first bad file."""
    manifest = read_manifest(model_dir)
    for name in manifest["files"]:
        _verified_bytes(model_dir, name, manifest)
    return manifest


def load_export(model_dir: str, check: bool = True) -> ExportedModel:
    """Load a model directory (weights through safetensors: no pickle is ever unpickled). With
    `check`, every file read is one the manifest lists, and its bytes match their sha256."""
    if check:
        manifest = read_manifest(model_dir)
        for name in manifest["files"]:  # listed files the loader does not parse are checked too
            if name not in FILES:
                _verified_bytes(model_dir, name, manifest)

        def read(name: str) -> bytes:  # each file the loader parses is read and hashed once
            return _verified_bytes(model_dir, name, manifest)
    else:
        def read(name: str) -> bytes:
            with open(os.path.join(model_dir, name), "rb") as f:
                return f.read()

    def parsed(name: str):
        try:
            return json.loads(read(name).decode("utf-8")) if name != WEIGHTS else load_tensors(read(name))
        except ArtifactError:
            raise
        except Exception as e:  # safetensors raises its own error types for a malformed header
            raise ArtifactError(f"{os.path.join(model_dir, name)}: cannot be parsed ({e}); {_REEXPORT}") from None

    config = parsed(CONFIG)
    if not isinstance(config, dict):
        raise ArtifactError(f"{os.path.join(model_dir, CONFIG)}: expected a JSON object; {_REEXPORT}")
    _check_format_version(config, os.path.join(model_dir, CONFIG))
    tensors = parsed(WEIGHTS)
    try:
        rows = {n: int(config["vocab_sizes"][n]) for n in config["user_features"]}
        tower = UserTower(rows, int(config["embedding_dim"]), config["user_layers"])
        state = {k[len("user."):]: v for k, v in tensors.items()
                 if k.startswith("user.emb.") or k.startswith("user.mlp.")}
        tower.load_state_dict(state, strict=True)
        tower.eval()
        return ExportedModel(
            config=config, user_tower=tower, user_features=tensors["user.features"].long(),
            item_vectors=tensors["item.vectors"].float(), popularity=tensors["item.popularity"].float(),
            seen_indptr=tensors["seen.indptr"].long(), seen_items=tensors["seen.items"].long(),
            user_ids=parsed(USERS), items=parsed(ITEMS), vocab=parsed(VOCAB), metrics=parsed(METRICS))
    except ArtifactError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ArtifactError(f"{model_dir}: {CONFIG} and {WEIGHTS} do not describe one model ({e}); "
                            f"{_REEXPORT}") from None


def save_export(model_dir: str, config: Dict, tensors: Mapping[str, torch.Tensor], user_ids: Sequence[int],
                items: Sequence[Dict], vocab: Mapping[str, Sequence[str]], metrics: Mapping) -> Dict:
    """Write a model directory from its parts; returns the manifest. `config` must hold
    embedding_dim, user_features, user_layers, vocab_sizes; model_version is derived from the weights."""
    from safetensors.torch import save_file

    os.makedirs(model_dir, exist_ok=True)
    required = {"user.features", "item.vectors", "item.popularity", "seen.indptr", "seen.items"}
    missing = required - set(tensors)
    if missing:
        raise ArtifactError(f"save_export: missing tensors {sorted(missing)}")
    weights = os.path.join(model_dir, WEIGHTS)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, weights)
    config = dict(config, format_version=FORMAT_VERSION)
    config.setdefault("model_version", sha256_file(weights)[:12])
    for name, obj in ((CONFIG, config), (USERS, list(user_ids)), (ITEMS, list(items)), (VOCAB, dict(vocab)),
                      (METRICS, dict(metrics))):
        with open(os.path.join(model_dir, name), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=name != ITEMS, ensure_ascii=False)
    return write_manifest(model_dir, config["model_version"])
