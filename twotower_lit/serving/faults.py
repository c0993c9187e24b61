"""Fault injection for tests of the shadow path: never set in production.

``TWOTOWER_FAULT_INJECTION="<variant>=<fault>[,<variant>=<fault>]"`` makes the server whose
``variant_name`` matches misbehave on every invocation (the variable reaches both variants'
processes, so it names the one to break):

* ``error``      predict raises (the variant answers 500)
* ``hang``       predict blocks for an hour
* ``crash``      the process exits at once (``os._exit``), as a segfault or OOM kill would
* ``sleep:<s>``  predict sleeps ``s`` seconds, then answers normally

A server with a fault configured logs a warning at start.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Optional

ENV = "TWOTOWER_FAULT_INJECTION"
log = logging.getLogger(__name__)


def for_variant(variant: str, spec: Optional[str] = None) -> Optional[str]:
    spec = os.environ.get(ENV, "") if spec is None else spec
    for part in spec.split(","):
        name, _, fault = part.partition("=")
        if name.strip() == variant and fault.strip():
            fault = fault.strip()
            if fault not in ("error", "hang", "crash") and not fault.startswith("sleep:"):
                raise ValueError(f"{ENV}: unknown fault {fault!r} (error, hang, crash, sleep:<seconds>)")
            log.warning("FAULT INJECTION: variant %r will %r on every invocation (%s is set)", variant, fault, ENV)
            return fault
    return None


def inject(fault: str) -> None:
    if fault == "error":
        raise RuntimeError("injected fault: error")
    if fault == "hang":
        time.sleep(3600)
    elif fault == "crash":
        os._exit(70)
    elif fault.startswith("sleep:"):
        time.sleep(float(fault.split(":", 1)[1]))
