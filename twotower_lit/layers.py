"""Plain-torch building blocks shared by the trained model and the exported (torchrec-free) one."""
from __future__ import annotations

from typing import List, Sequence

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
