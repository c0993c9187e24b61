"""Serving: SageMaker handler functions, the HTTP endpoint, shadow mirroring, data capture, the
load generator and the shadow-test report.

Modules and what they import (the inference handler needs only the torch-only ones):
    errors, request, recommender, handler, faults,  torch, numpy, safetensors (via export.format);
    options                                         faiss too (export.search), to read an index built at export
    synthetic                                       + numpy (random exports for tests/benchmarks)
    capture                                         standard library only
    app, shadow, server                             + starlette, uvicorn, httpx
    load                                            + httpx (pyarrow only to read a prepared split)
    report                                          + numpy, matplotlib (pyarrow for held-out labels)

Test hook: ``TWOTOWER_FAULT_INJECTION`` makes a named variant fail, hang, crash or sleep
(`faults`); only the tests set it, and a server with it set says so in its log.
"""
