"""inference.py driven exactly as SageMaker's inference toolkit drives it, from a model.tar.gz-like
layout: model files at the top, code/inference.py next to the vendored library files
(`handler_modules()`), in a fresh interpreter that cannot see the repository."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from twotower_lit.serving.package import handler_modules

REPO = Path(__file__).resolve().parents[2]

DRIVER = r'''
import json, sys
# an editable install of the project (pip install -e) would resolve missing vendored modules from
# the checkout; a real container has no such thing
sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
sys.path_hooks = [h for h in sys.path_hooks if not getattr(h, "__module__", "").startswith("__editable__")]
from sagemaker_inference.transformer import Transformer

class RequestProcessor:
    def __init__(self, headers):
        self.headers = headers
    def get_request_properties(self):
        return self.headers

class Context:
    """What the model server hands the toolkit: system properties, request headers, response setters."""
    def __init__(self, model_dir, headers):
        self.system_properties = {"model_dir": model_dir, "gpu_id": None}
        self.request_processor = [RequestProcessor(headers)]
        self.status, self.phrase, self.content_type = 200, None, None
    def set_response_status(self, code, phrase):
        self.status, self.phrase = code, phrase
    def set_response_content_type(self, idx, content_type):
        self.content_type = content_type

model_dir = sys.argv[1]
transformer = Transformer()
results = []
for body, headers in json.loads(sys.stdin.read()):
    ctx = Context(model_dir, headers)
    # a body is text, or {"hex": ...} for bytes that are not UTF-8
    raw = bytes.fromhex(body["hex"]) if isinstance(body, dict) else body.encode()
    out = transformer.transform([{"body": raw}], ctx)[0]
    out = out.decode() if isinstance(out, bytes) else out
    results.append({"status": ctx.status, "content_type": ctx.content_type, "body": out, "phrase": ctx.phrase})
import twotower_lit
heavy = sorted(m for m in sys.modules
               if m.split(".")[0] in ("torchrec", "pyarrow", "lightning", "pandas", "fbgemm_gpu"))
files = sorted(m.__file__ for n, m in sys.modules.items()
               if n.split(".")[0] == "twotower_lit" and getattr(m, "__file__", None))
print(json.dumps({"results": results, "heavy": heavy, "library": list(twotower_lit.__path__), "files": files,
                  "threads": __import__("torch").get_num_threads()}))
'''


def _package(model_dir, tmp_path) -> Path:
    """A model.tar.gz's layout, unpacked: the model files, code/inference.py and the vendored library."""
    root = tmp_path / "model"
    shutil.copytree(model_dir, root)
    (root / "code").mkdir()
    shutil.copy(REPO / "entrypoints" / "inference.py", root / "code" / "inference.py")
    for module in handler_modules():
        (root / "code" / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / module, root / "code" / module)
    return root


def _transform(root, tmp_path, requests, env=None) -> dict:
    """Run `requests` through the toolkit's Transformer in a fresh interpreter that sees only code/."""
    full_env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # the toolkit imports SAGEMAKER_PROGRAM's module from code/, which the model server puts on the path
    full_env.update(PYTHONPATH=str(root / "code"), SAGEMAKER_PROGRAM="inference.py", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", DRIVER, str(root)], input=json.dumps(requests), env=full_env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["stderr"] = proc.stderr
    return out


def test_toolkit_transformer_serves_the_packaged_handler(model_dir, tmp_path):
    root = _package(model_dir, tmp_path)
    requests = [
        ('{"user_id": 3, "k": 4}', {"Content-Type": "application/json", "Accept": "application/json"}),
        ('{"inputs": [1, 2, 12345]}', {"content-type": "application/json"}),
        ("5\n6\n", {"Content-Type": "text/csv", "Accept": "*/*"}),
        ('{"user_features": {"gender": "M", "age": 25}, "k": 2}', {"Content-Type": "application/json"}),
        ('{"user_id": 3, "k": 1000}', {"Content-Type": "application/json"}),
        ('{"user_id": ', {"Content-Type": "application/json"}),
        ('{"user_id": 3}', {"Content-Type": "application/json", "Accept": "text/csv"}),
        ('{"user_id": 3}', {"Content-Type": "application/x-npy"}),
        ({"hex": "7b22757365725f6964223a20ff7d"}, {"Content-Type": "application/json"}),  # not UTF-8
        ({"hex": "35fe0a"}, {"Content-Type": "text/csv"}),
        ('{"user_features": {"age": "inf"}}', {"Content-Type": "application/json"}),
    ]
    out = _transform(root, tmp_path, requests)
    assert out["library"] == [str(root / "code" / "twotower_lit")], "the vendored copy must be the one imported"
    assert out["heavy"] == [], f"the handler imported {out['heavy']}"
    outside = [f for f in out["files"] if not f.startswith(str(root / "code") + os.sep)]
    assert outside == [], f"imported from outside code/: {outside}"
    assert out["files"] and len(out["files"]) <= len(handler_modules())
    assert out["threads"] == 1
    r = out["results"]
    single = json.loads(r[0]["body"])
    assert r[0]["status"] == 200 and r[0]["content_type"] == "application/json"
    assert len(single["predictions"]) == 1 and len(single["predictions"][0]["items"]) == 4
    assert [p["source"] for p in json.loads(r[1]["body"])["predictions"]] == ["model", "model", "popularity"]
    assert [p["user_id"] for p in json.loads(r[2]["body"])["predictions"]] == [5, 6]
    assert json.loads(r[3]["body"])["predictions"][0]["source"] == "cold_start"
    for res, status, field in ((r[4], 400, "k"), (r[5], 400, "body"), (r[6], 406, "Accept"),
                               (r[7], 415, "Content-Type"), (r[8], 400, "body"), (r[9], 400, "body"),
                               (r[10], 400, "user_features.age")):
        assert res["status"] == status, res
        # the whole body is our JSON error: no traceback after it (nor paths of the container in it)
        error = json.loads(res["body"])["error"]
        assert error["field"] == field and error["status"] == status, res
        assert res["content_type"] == "application/json" and "Traceback" not in res["body"]
    assert "UTF-8" in json.loads(r[8]["body"])["error"]["message"]


def test_toolkit_server_errors_are_json_with_the_traceback_in_the_log_only(model_dir, tmp_path):
    root = _package(model_dir, tmp_path)
    out = _transform(root, tmp_path, [('{"user_id": 3}', {"Content-Type": "application/json"})],
                     env={"TWOTOWER_FAULT_INJECTION": "production=error"})
    (res,) = out["results"]
    assert res["status"] == 500 and res["content_type"] == "application/json", res
    assert json.loads(res["body"])["error"]["field"] == "server"
    assert "Traceback" not in res["body"] and str(root) not in res["body"]
    assert "Traceback" in out["stderr"] and "injected fault" in out["stderr"]


def test_inference_module_loads_from_the_repository_by_path(model_dir, tmp_path):
    """Imported by file path from another directory, it finds the library next to it."""
    code = ("import importlib.util, sys, json\n"
            "sys.meta_path = [f for f in sys.meta_path "
            "if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            "spec = importlib.util.spec_from_file_location("
            f"'inference', {str(REPO / 'entrypoints' / 'inference.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            f"model = m.model_fn({model_dir!r})\n"
            "body, ct = m.output_fn(m.predict_fn(m.input_fn('{\"user_id\": 2, \"k\": 3}', 'application/json'), "
            "model), None)\n"
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('torchrec', 'pyarrow', 'lightning'))\n"
            "print(json.dumps({'ct': ct, 'n': len(json.loads(body)['predictions'][0]['items']), 'heavy': heavy}))\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"ct": "application/json", "n": 3, "heavy": []}


def test_model_fn_rejects_a_corrupted_artifact(model_dir, tmp_path):
    import pytest
    from twotower_lit.export.format import ArtifactError
    from twotower_lit.serving import handler

    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    with open(bad / "items.json", "a") as f:
        f.write(" ")
    with pytest.raises(ArtifactError, match="items.json"):
        handler.load_model(str(bad))


def test_settings_come_from_twotower_environment_variables():
    import pytest
    from twotower_lit.serving.handler import config_from_env

    cfg = config_from_env({"TWOTOWER_NUM_THREADS": "2", "TWOTOWER_MAX_K": "50", "SM_MODEL_DIR": "/opt/x"})
    assert (cfg.num_threads, cfg.max_k, cfg.model_dir, cfg.default_k) == (2, 50, "/opt/x", 10)
    with pytest.raises(ValueError, match="TWOTOWER_"):
        config_from_env({"TWOTOWER_NUM_THREADS": "two"})


def test_server_rejects_impossible_settings_naming_them():
    import pytest
    from twotower_lit.serving.server import check, parse_args

    cfg = parse_args(["serve", "--model-dir", "/m", "--num-threads", "0", "--default-k", "200"])
    with pytest.raises(SystemExit, match="--num-threads must be at least 1; --default-k"):
        check(cfg)
    check(parse_args(["--model-dir", "/m", "--port", "9000"]))
