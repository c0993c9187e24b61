"""A reference reader of an exported model that shares no code with the project's loader: the
export's files read with safetensors' numpy loader and json, the user tower run in numpy."""
import json
import os

import numpy as np


class NumpyModel:
    """The exported model read straight from its files: embedding rows concatenated in the config's
    feature order, then Linear layers with ReLU between them (none after the last), in float64."""

    def __init__(self, model_dir):
        from safetensors.numpy import load_file

        t = load_file(os.path.join(model_dir, "model.safetensors"))
        with open(os.path.join(model_dir, "config.json")) as f:
            self.config = json.load(f)
        with open(os.path.join(model_dir, "users.json")) as f:
            self.index = {raw: i for i, raw in enumerate(json.load(f)) if i > 0}
        with open(os.path.join(model_dir, "vocab.json")) as f:
            self.vocab = json.load(f)
        self.emb = [t[f"user.emb.{n}.weight"].astype(np.float64) for n in self.config["user_features"]]
        linear = sorted({int(k.split(".")[2]) for k in t if k.startswith("user.mlp.")})
        self.layers = [(t[f"user.mlp.{i}.weight"].astype(np.float64), t[f"user.mlp.{i}.bias"].astype(np.float64))
                       for i in linear]
        self.items = t["item.vectors"].astype(np.float64)
        self.features = t["user.features"]
        self.indptr, self.seen_items = t["seen.indptr"], t["seen.items"]

    def vector(self, row):
        x = np.concatenate([table[int(i)] for table, i in zip(self.emb, row)])
        for n, (w, b) in enumerate(self.layers):
            x = w @ x + b
            if n < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x

    def seen_columns(self, user_id):
        i = self.index[user_id]
        return [int(j) - 1 for j in self.seen_items[self.indptr[i]:self.indptr[i + 1]]]  # item index j is column j-1

    def topk(self, row, k, exclude_cols=()):
        scores = self.items @ self.vector(row)
        scores[list(exclude_cols)] = -np.inf
        order = np.argsort(-scores, kind="stable")[:k]
        return [int(c) for c in order if np.isfinite(scores[c])], scores

    def users(self, indices: np.ndarray) -> np.ndarray:
        x = np.concatenate([table[self.features[indices, j]] for j, table in enumerate(self.emb)], axis=1)
        for n, (w, b) in enumerate(self.layers):
            x = x @ w.T + b
            if n < len(self.layers) - 1:
                x = np.maximum(x, 0.0)
        return x
