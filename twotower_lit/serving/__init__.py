"""Serving: SageMaker handler functions, the HTTP endpoint, shadow mirroring, data capture, the
load generator and the shadow-test report.

Modules and what they import (the inference handler needs only the torch-only ones):
    errors, request, recommender, handler, faults,  torch, numpy, safetensors (via export.format);
    options, search                                 faiss too, to read an index built at export
    synthetic                                       + numpy (random exports for tests/benchmarks)
    capture                                         standard library only
    app, shadow, server                             + starlette, uvicorn, httpx
    load                                            + httpx (pyarrow only to read a prepared split)
    report                                          + numpy, matplotlib (pyarrow for held-out labels)

Test hook: ``TWOTOWER_FAULT_INJECTION`` makes a named variant fail, hang, crash or sleep
(`faults`); only the tests set it, and a server with it set says so in its log.
"""

# The files `entrypoints/inference.py` imports (directly or not), relative to the repository root:
# what a model.tar.gz's code/ folder must vendor next to inference.py. Tested by
# tests/serving/test_inference_contract.py, which runs the handler from exactly these files.
HANDLER_MODULES = (
    "twotower_lit/__init__.py", "twotower_lit/config.py", "twotower_lit/layers.py",
    "twotower_lit/export/__init__.py", "twotower_lit/export/format.py",
    "twotower_lit/data/__init__.py", "twotower_lit/data/features.py",
    "twotower_lit/serving/__init__.py", "twotower_lit/serving/errors.py", "twotower_lit/serving/request.py",
    "twotower_lit/serving/recommender.py", "twotower_lit/serving/handler.py", "twotower_lit/serving/faults.py",
    "twotower_lit/serving/options.py", "twotower_lit/serving/search.py",
)
