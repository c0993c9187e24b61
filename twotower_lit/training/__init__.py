"""The training job (`job.run`) and its parts: the run plan, the LightningModule, the step runners,
callbacks and the report."""
from twotower_lit.training.job import run

__all__ = ["run"]
