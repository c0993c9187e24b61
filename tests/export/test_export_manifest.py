"""The exported model's manifest is checked against the format, not trusted: every file the loader
reads must be listed with a matching sha256. Through the real CLIs (`entrypoints.evaluate`,
`entrypoints.serve`) as subprocesses, and the loader's messages for a broken manifest."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from twotower_lit.config import PrepareConfig
from twotower_lit.data.prepare import prepare_dataset
from twotower_lit.export.format import FILES, MANIFEST, WEIGHTS, ArtifactError, load_export, verify
from twotower_lit.serving.synthetic import random_export

REPO = Path(__file__).resolve().parents[2]
ENV = dict(os.environ, PYTHONPATH=str(REPO))


@pytest.fixture(scope="module")
def prepared_and_model(tmp_path_factory, synthetic_movielens):
    """A prepared synthetic set and a random export sized to its vocabularies (so evaluate runs)."""
    root = tmp_path_factory.mktemp("export")
    data = root / "data"
    m = prepare_dataset(PrepareConfig(data_dir=str(synthetic_movielens("ml-1m")), min_shards=1), str(data),
                        log=lambda _: None)
    model = root / "model"
    random_export(str(model), m["vocab_sizes"]["user"] - 1, m["vocab_sizes"]["item"] - 1, seed=0)
    return data, model


def _copy(model: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model, dst)
    return dst


def _unlist_weights_and_flip_a_byte(model: Path) -> None:
    """The attack: drop model.safetensors from the manifest, then change one weight byte."""
    manifest = json.loads((model / MANIFEST).read_text())
    del manifest["files"][WEIGHTS]
    (model / MANIFEST).write_text(json.dumps(manifest))
    data = bytearray((model / WEIGHTS).read_bytes())
    data[-5] ^= 0xFF  # the last bytes are tensor data, not the safetensors header
    (model / WEIGHTS).write_bytes(bytes(data))


def _evaluate(model: Path, data: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "entrypoints.evaluate", "--model-dir", str(model),
                           "--data-dir", str(data)], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)


def test_evaluate_refuses_a_weight_file_left_out_of_the_manifest(prepared_and_model, tmp_path):
    data, model = prepared_and_model
    ok = _evaluate(model, data)
    assert ok.returncode == 0, ok.stderr
    assert "auc" in json.loads(ok.stdout)["test"]

    bad = _copy(model, tmp_path)
    _unlist_weights_and_flip_a_byte(bad)
    run = _evaluate(bad, data)
    assert run.returncode != 0
    assert "Traceback" not in run.stderr
    assert str(bad / MANIFEST) in run.stderr and WEIGHTS in run.stderr and "export the model again" in run.stderr


def test_serve_refuses_to_start_on_a_weight_file_left_out_of_the_manifest(prepared_and_model, tmp_path):
    _, model = prepared_and_model
    bad = _copy(model, tmp_path)
    _unlist_weights_and_flip_a_byte(bad)
    port = _free_port()
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "entrypoints.serve", "--model-dir", str(bad), "--host",
                                 "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                                cwd=REPO, env=ENV, stdout=log, stderr=subprocess.STDOUT)
        try:
            healthy = False
            deadline = time.monotonic() + 90
            while proc.poll() is None and time.monotonic() < deadline:
                try:
                    healthy = healthy or httpx.get(f"http://127.0.0.1:{port}/ping", timeout=1).status_code == 200
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
            assert proc.poll() is not None, "the server kept running on a tampered model"
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    assert proc.returncode != 0 and not healthy
    log = log_path.read_text()
    assert log.startswith("serve: ") and WEIGHTS in log and MANIFEST in log and "Traceback" not in log


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("name", FILES)
def test_every_file_the_loader_reads_must_be_listed(prepared_and_model, tmp_path, name):
    model = _copy(prepared_and_model[1], tmp_path)
    manifest = json.loads((model / MANIFEST).read_text())
    del manifest["files"][name]
    (model / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match=f"does not list {name}"):
        load_export(str(model))


@pytest.mark.parametrize("text, problem", [
    ("{not json", "not valid JSON"),
    ('["files"]', "expected a JSON object"),
    ('{"format_version": 1, "model_version": "x"}', "no 'files' object"),
    ('{"format_version": 1, "files": ["model.safetensors"]}', "no 'files' object"),
    ('{"format_version": 7, "files": {}}', "format_version 7"),
    ('{"files": {}}', "format_version None"),
    ('{"format_version": "1", "files": {}}', "format_version '1'"),
    ('{"format_version": true, "files": {}}', "format_version True"),
    ('{"format_version": 1.0, "files": {}}', "format_version 1.0"),
    ('{"format_version": 1, "files": {"model.safetensors": "abc"}}', "not a sha256"),
    ('{"format_version": 1, "files": {"../../etc/passwd": "%s"}}' % ("0" * 64), "not a file of the model"),
])
def test_a_broken_manifest_is_named_with_what_to_do(prepared_and_model, tmp_path, text, problem):
    model = _copy(prepared_and_model[1], tmp_path)
    (model / MANIFEST).write_text(text)
    with pytest.raises(ArtifactError, match=problem) as info:
        verify(str(model))
    assert str(model / MANIFEST) in str(info.value) and "export the model again" in str(info.value)


@pytest.mark.parametrize("version", [2, None, "1"])
def test_a_config_of_another_format_version_is_refused_even_when_the_manifest_vouches_for_it(
        prepared_and_model, tmp_path, version):
    """The manifest's checksums say the bytes are the ones written, not that this code reads them:
    config.json's own format_version must be this format's too (with and without the checksums)."""
    import hashlib

    model = _copy(prepared_and_model[1], tmp_path)
    config = json.loads((model / "config.json").read_text())
    assert config["format_version"] == 1
    if version is None:
        del config["format_version"]
    else:
        config["format_version"] = version
    (model / "config.json").write_text(json.dumps(config))
    manifest = json.loads((model / MANIFEST).read_text())
    manifest["files"]["config.json"] = hashlib.sha256((model / "config.json").read_bytes()).hexdigest()
    (model / MANIFEST).write_text(json.dumps(manifest))
    verify(str(model))  # every checksum matches
    for check in (True, False):
        with pytest.raises(ArtifactError, match=f"config.json: format_version {version!r}, this code reads 1"):
            load_export(str(model), check=check)


def test_listed_files_are_checked_and_an_intact_export_loads(prepared_and_model, tmp_path):
    model = _copy(prepared_and_model[1], tmp_path)
    assert load_export(str(model)).num_items > 0
    items = json.loads((model / "items.json").read_text())
    items[0]["title"] = "Something else"
    (model / "items.json").write_text(json.dumps(items))
    with pytest.raises(ArtifactError, match="items.json: sha256 does not match"):
        load_export(str(model))
