"""The server's settings: `twotower_lit.config.ServeConfig` plus how requests are micro-batched and
which search answers (an index built at export, see `twotower_lit.export.search`). The command
line, ``TWOTOWER_<FIELD>`` variables and the shadow child all go through this class."""
from __future__ import annotations

from dataclasses import dataclass

from twotower_lit.config import ServeConfig
from twotower_lit.options import opt as _opt
from twotower_lit.export.search import SEARCHES


@dataclass
class ServingConfig(ServeConfig):
    search: str = _opt("auto", "top-k search: auto (the export's default index, else exact), exact (torch over "
                       "every item), faiss (the export's faiss index, else HNSW built at load), or an index of the "
                       "export by name (hnsw, ivf, hnsw-int8, ...: python -m entrypoints.index builds them)", SEARCHES)
    batch_max_requests: int = _opt(32, "most concurrent requests scored together (one user-tower pass, one top-k); "
                                       "1: each request alone")
    batch_max_wait_ms: float = _opt(0.2, "how long the first request of a batch waits for more to join (ms); "
                                         "requests that arrive while a batch computes join the next one anyway")
