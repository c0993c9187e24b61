"""Distribution of the two-tower model over processes and GPUs with TorchRec, behind a Lightning strategy."""
from twotower_lit.distributed.strategy import TorchRecStrategy

__all__ = ["TorchRecStrategy"]
