"""SageMaker's model.tar.gz: model files at the top, `code/` with the inference module, the
torch-only part of the library it imports, and its requirements."""
from __future__ import annotations

import functools
import io
import modulefinder
import os
import tarfile
from typing import Iterable, Tuple

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
INFERENCE_MODULE = os.path.join("entrypoints", "inference.py")


@functools.lru_cache(maxsize=None)
def handler_modules() -> Tuple[str, ...]:
    """The files of this library that `entrypoints/inference.py` imports, directly or not (also
    inside functions), relative to the repository root: what a model.tar.gz's code/ folder vendors
    next to it. Found by reading the imports (the standard library's `modulefinder`, searching this
    repository only), so the list cannot drift from the code; tests/serving/test_inference_contract.py
    runs the handler from exactly these files."""
    finder = modulefinder.ModuleFinder(path=[PACKAGE_ROOT])
    finder.run_script(os.path.join(PACKAGE_ROOT, INFERENCE_MODULE))
    return tuple(sorted(os.path.relpath(m.__file__, PACKAGE_ROOT) for name, m in finder.modules.items()
                        if name.split(".")[0] == "twotower_lit" and m.__file__))
SERVING_REQUIREMENTS = "safetensors==0.8.0\nnumpy\n"
# an export with a search index (index.json) is served through faiss, which AWS's PyTorch image lacks
INDEX_REQUIREMENTS = "faiss-cpu==1.15.1\n"


def _add_tree(tar: tarfile.TarFile, path: str, arcname: str) -> None:
    def clean(info: tarfile.TarInfo):
        if "__pycache__" in info.name or info.name.endswith(".pyc"):
            return None
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        return info

    tar.add(path, arcname=arcname, filter=clean)


def package_model(model_dir: str, out_path: str, extra_modules: Iterable[str] = ()) -> str:
    """Write `out_path` (model.tar.gz) from an exported model directory."""
    with tarfile.open(out_path, "w:gz") as tar:
        for name in sorted(os.listdir(model_dir)):
            _add_tree(tar, os.path.join(model_dir, name), name)
        _add_tree(tar, os.path.join(PACKAGE_ROOT, INFERENCE_MODULE), "code/inference.py")
        for module in (*handler_modules(), *extra_modules):
            src = os.path.join(PACKAGE_ROOT, module)
            if not os.path.exists(src):
                raise FileNotFoundError(f"{src} is missing: the serving code cannot be packaged without it")
            _add_tree(tar, src, "code/" + module)
        info = tarfile.TarInfo("code/requirements.txt")
        data = (SERVING_REQUIREMENTS + (INDEX_REQUIREMENTS if os.path.exists(os.path.join(model_dir, "index.json"))
                                        else "")).encode()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out_path
