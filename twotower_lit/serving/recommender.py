"""Top-k recommendations from an `ExportedModel`: known users, cold-start users and a popularity
fallback, with the items a user rated in training excluded.

score(user, item) = <user tower(user features), item vector>, the retrieval score the model was
trained on (all dimensions, the exposure ones too: see `twotower_lit.model.TwoTower`).
Exact search (`ExactSearch`, torch.topk over every real item) is the default; `FaissSearch` is an
approximate inner-product HNSW index for when faiss is installed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from twotower_lit.config import PrepareConfig
from twotower_lit.data.features import UserFeatureEncoder
from twotower_lit.export.format import ExportedModel
from twotower_lit.serving.request import RecommendRequest, UserQuery

MODEL = "model"            # a user known to the model: its training features
COLD_START = "cold_start"  # an unknown user scored from the side features in the request
POPULARITY = "popularity"  # no usable features: the most popular items in training

_CHUNK = 256  # users scored at once: bounds the [users, items] score matrix (62k items: 64 MB)


class ExactSearch:
    """Exact maximum inner product: every real item scored, torch.topk."""

    name = "exact"

    def __init__(self, item_vectors: torch.Tensor) -> None:
        self.item_t = item_vectors.t().contiguous()

    def topk(self, user_vectors: torch.Tensor, k: int,
             exclude: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """[B, k] scores and 0-based item columns, best first; excluded columns get -inf."""
        scores = user_vectors @ self.item_t
        _mask(scores, exclude)
        return torch.topk(scores, k=min(k, scores.shape[1]), dim=1)


class FaissSearch:
    """Approximate maximum inner product: a faiss HNSW index with METRIC_INNER_PRODUCT (not L2, which
    would rank by distance and not by the score the model was trained on). Excluded items are
    filtered out of an enlarged candidate list."""

    name = "faiss"

    def __init__(self, item_vectors: torch.Tensor, neighbours: int = 32, ef_search: int = 128) -> None:
        try:
            import faiss  # only this search needs it (AWS's PyTorch inference image lacks it)
        except ImportError as e:
            raise ImportError("--search faiss needs the faiss-cpu package (pinned in requirements/base.txt and "
                              "installed in this project's serving image); install it or use --search exact") from e

        vectors = item_vectors.float().contiguous().numpy()
        self.num_items = vectors.shape[0]
        self.index = faiss.IndexHNSWFlat(vectors.shape[1], neighbours, faiss.METRIC_INNER_PRODUCT)
        self.index.hnsw.efConstruction = 2 * ef_search
        self.index.add(vectors)
        self.ef_search = ef_search

    def topk(self, user_vectors: torch.Tensor, k: int,
             exclude: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        longest = max((len(e) for e in exclude), default=0)
        fetch = min(self.num_items, k + longest)
        self.index.hnsw.efSearch = max(self.ef_search, fetch)
        scores, cols = self.index.search(user_vectors.float().contiguous().numpy(), fetch)
        scores, cols = torch.from_numpy(scores), torch.from_numpy(cols).long()
        scores[cols < 0] = -math.inf  # faiss pads with -1 when it finds fewer than asked
        cols = cols.clamp(min=0)
        for row, ex in enumerate(exclude):
            if len(ex):
                scores[row, torch.isin(cols[row], ex)] = -math.inf
        order = torch.topk(scores, k=min(k, fetch), dim=1).indices
        return torch.gather(scores, 1, order), torch.gather(cols, 1, order)


def build_search(kind: str, item_vectors: torch.Tensor):
    if kind == "exact":
        return ExactSearch(item_vectors)
    if kind == "faiss":
        try:
            return FaissSearch(item_vectors)
        except ImportError as e:
            raise RuntimeError("search 'faiss' needs the faiss package (pip install faiss-cpu); "
                               "use search 'exact' otherwise") from e
    raise ValueError(f"unknown search {kind!r}; use 'exact' or 'faiss'")


def _mask(scores: torch.Tensor, exclude: Sequence[torch.Tensor]) -> None:
    lengths = torch.tensor([len(e) for e in exclude], dtype=torch.long)
    if int(lengths.sum()) == 0:
        return
    rows = torch.repeat_interleave(torch.arange(len(exclude)), lengths)
    scores[rows, torch.cat(list(exclude))] = -math.inf


@dataclass
class Recommendation:
    """The ranked items for one user of a request."""

    user_id: Optional[int]
    source: str
    columns: List[int]  # 0-based item columns, best first
    scores: List[float]
    reason: Optional[str] = None


class Recommender:
    """Recommends for a batch of `UserQuery`s from one exported model."""

    def __init__(self, model: ExportedModel, search: str = "exact") -> None:
        self.model = model
        self.user_index: Dict[int, int] = model.user_index()
        self.feature_names: List[str] = list(model.config["user_features"])
        zip_chars = int(model.config.get("zip_prefix", PrepareConfig.zip_prefix))
        self.side_features = [n for n in self.feature_names if n != "user"]
        self.encoder = UserFeatureEncoder(model.vocab, zip_chars) if self.side_features else None
        self.search = build_search(search, model.item_vectors)
        self.popular = torch.argsort(model.popularity, descending=True, stable=True)

    @property
    def model_version(self) -> str:
        return self.model.model_version

    def features_of(self, query: UserQuery) -> Tuple[str, Optional[torch.Tensor], Optional[str]]:
        """(source, feature row or None, why the fallback) for one query."""
        if query.user_id is not None and query.user_id in self.user_index:
            return MODEL, self.model.user_features[self.user_index[query.user_id]], None
        if query.features is None:
            return POPULARITY, None, "unknown user_id and no user_features"
        if self.encoder is None:
            return POPULARITY, None, "this model has no user side features to score a new user by"
        encoded = self.encoder(query.features)
        if not any(encoded.get(name, 0) for name in self.side_features):
            return POPULARITY, None, "none of the user_features is in the model's vocabulary"
        row = torch.tensor([0 if name == "user" else encoded.get(name, 0) for name in self.feature_names],
                           dtype=torch.long)
        return COLD_START, row, None

    @torch.no_grad()
    def recommend(self, request: RecommendRequest) -> List[Recommendation]:
        out: List[Optional[Recommendation]] = [None] * len(request.users)
        scored: List[Tuple[int, str, torch.Tensor]] = []
        for pos, query in enumerate(request.users):
            source, row, reason = self.features_of(query)
            if row is None:
                k = min(request.k, self.model.num_items)
                cols = self.popular[:k]
                out[pos] = Recommendation(query.user_id, source, cols.tolist(),
                                          self.model.popularity[cols].tolist(), reason)
            else:
                scored.append((pos, source, row))
        for lo in range(0, len(scored), _CHUNK):
            chunk = scored[lo:lo + _CHUNK]
            vectors = self.model.user_vectors(torch.stack([row for _, _, row in chunk]))
            exclude = [self._seen_columns(request.users[pos], request.exclude_seen) for pos, _, _ in chunk]
            scores, cols = self.search.topk(vectors, request.k, exclude)
            for (pos, source, _), s, c in zip(chunk, scores.tolist(), cols.tolist()):
                keep = [j for j, v in enumerate(s) if v != -math.inf]  # a user who rated almost everything
                out[pos] = Recommendation(request.users[pos].user_id, source,
                                          [c[j] for j in keep], [s[j] for j in keep])
        return out  # type: ignore[return-value]

    def _seen_columns(self, query: UserQuery, exclude_seen: bool) -> torch.Tensor:
        index = self.user_index.get(query.user_id) if query.user_id is not None else None
        if not exclude_seen or index is None:
            return torch.zeros(0, dtype=torch.long)
        return self.model.seen(index) - 1  # item index j + 1 is column j
