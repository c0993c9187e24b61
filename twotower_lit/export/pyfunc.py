"""MLflow pyfunc wrapper of the exported model: predict(DataFrame with user_id) -> top-k items."""
from __future__ import annotations

import mlflow.pyfunc
import pandas as pd


class ExportedModelPyfunc(mlflow.pyfunc.PythonModel):
    """Scores known users against every item with the exported towers (torch only)."""

    def load_context(self, context) -> None:
        from twotower_lit.export.format import load_export

        self.model = load_export(context.artifacts["model_dir"])
        self.index = self.model.user_index()

    # (the annotation tells MLflow the input is a DataFrame checked against the logged signature)
    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        import torch

        k = int((params or {}).get("k", 10))
        rows = []
        for uid in model_input["user_id"].tolist():
            u = self.index.get(int(uid), 0)
            vec = self.model.user_vectors(self.model.user_features[u:u + 1])
            scores = self.model.scores(vec)[0]
            if u:
                scores[self.model.seen(u) - 1] = -float("inf")
            top = torch.topk(scores, k)
            rows.append({"user_id": int(uid), "items": [self.model.items[i]["id"] for i in top.indices.tolist()],
                         "scores": top.values.tolist()})
        return pd.DataFrame(rows)
