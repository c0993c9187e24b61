"""Plain-torch building blocks shared by the trained model and the exported (torchrec-free) one."""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn


def mlp(in_dim: int, layers: Sequence[int]) -> nn.Sequential:
    """Linear/ReLU stack whose last layer has no activation (scores must be free to go negative)."""
    modules: List[nn.Module] = []
    for i, out_dim in enumerate(layers):
        modules.append(nn.Linear(in_dim, out_dim))
        if i < len(layers) - 1:
            modules.append(nn.ReLU())
        in_dim = out_dim
    return nn.Sequential(*modules)


def logits(user: torch.Tensor, item: torch.Tensor, exposure_dims: int = 0) -> torch.Tensor:
    """Liking logit of each row: the dot product of the tower outputs without their last
    `exposure_dims` dimensions (`twotower_lit.model.TwoTower`; the retrieval score is the whole
    dot product)."""
    if exposure_dims:
        width = user.shape[1] - exposure_dims
        user, item = user[:, :width], item[:, :width]
    return (user * item).sum(dim=1)
