"""Top-k recommendations from an `ExportedModel`: known users, cold-start users and a popularity
fallback, with the items a user rated in training excluded.

score(user, item) = <user tower(user features), item vector>, the retrieval score the model was
trained on (all dimensions, the exposure ones too: see `twotower_lit.model.TwoTower`).
The search (`twotower_lit.export.search`) is exact (torch.topk over every real item) or an
approximate faiss index built at export. `recommend_many` scores the users of several requests
together (one user-tower pass and one search), which is how the server's micro-batches are scored.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from twotower_lit.config import PrepareConfig
from twotower_lit.data.features import UserFeatureEncoder
from twotower_lit.export.format import ExportedModel
from twotower_lit.serving.request import RecommendRequest, UserQuery
from twotower_lit.export.search import open_search

MODEL = "model"            # a user known to the model: its training features
COLD_START = "cold_start"  # an unknown user scored from the side features in the request
POPULARITY = "popularity"  # no usable features: the most popular items in training

_SCORED_CHUNK = 1024  # users through the user tower and the search at once


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

    def __init__(self, model: ExportedModel, search: str = "exact", model_dir: Optional[str] = None) -> None:
        self.model = model
        self.user_index: Dict[int, int] = model.user_index()
        self.feature_names: List[str] = list(model.config["user_features"])
        zip_chars = int(model.config.get("zip_prefix", PrepareConfig.zip_prefix))
        self.side_features = [n for n in self.feature_names if n != "user"]
        self.encoder = UserFeatureEncoder(model.vocab, zip_chars) if self.side_features else None
        self.search = open_search(search, model, model_dir)  # an index of the export needs its directory
        # float64, then float32: a user's vector comes out the same in any batch (float32 matrix
        # products round differently with the number of rows), so its answer does too
        self.user_tower = copy.deepcopy(model.user_tower).double()
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

    def recommend(self, request: RecommendRequest) -> List[Recommendation]:
        return self.recommend_many([request])[0]

    @torch.no_grad()
    def recommend_many(self, requests: Sequence[RecommendRequest]) -> List[List[Recommendation]]:
        """Each request's recommendations; the users of all of them are scored together, each with
        its own request's k and seen-item exclusion."""
        out: List[List[Optional[Recommendation]]] = [[None] * len(r.users) for r in requests]
        scored: List[Tuple[int, int, str, torch.Tensor]] = []
        for n, request in enumerate(requests):
            for pos, query in enumerate(request.users):
                source, row, reason = self.features_of(query)
                if row is None:
                    k = min(request.k, self.model.num_items)
                    cols = self.popular[:k]
                    out[n][pos] = Recommendation(query.user_id, source, cols.tolist(),
                                                 self.model.popularity[cols].tolist(), reason)
                else:
                    scored.append((n, pos, source, row))
        for lo in range(0, len(scored), _SCORED_CHUNK):
            chunk = scored[lo:lo + _SCORED_CHUNK]
            vectors = self.user_tower(torch.stack([row for _, _, _, row in chunk])).float()
            exclude = [self._seen_columns(requests[n].users[pos], requests[n].exclude_seen) for n, pos, _, _ in chunk]
            scores, cols = self.search.topk(vectors, max(requests[n].k for n, _, _, _ in chunk), exclude)
            for (n, pos, source, _), s, c in zip(chunk, scores.tolist(), cols.tolist()):
                k = requests[n].k  # the batch's top-k is the largest k asked; each request gets its own
                keep = [j for j, v in enumerate(s[:k]) if v != -math.inf]  # a user who rated almost everything
                out[n][pos] = Recommendation(requests[n].users[pos].user_id, source,
                                             [c[j] for j in keep], [s[j] for j in keep])
        return out  # type: ignore[return-value]

    def _seen_columns(self, query: UserQuery, exclude_seen: bool) -> torch.Tensor:
        index = self.user_index.get(query.user_id) if query.user_id is not None else None
        if not exclude_seen or index is None:
            return torch.zeros(0, dtype=torch.long)
        return self.model.seen(index) - 1  # item index j + 1 is column j
