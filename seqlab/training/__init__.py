"""The pieces of a training run that `seqlab.train.train_and_evaluate` assembles: the optimizer (`optim`), losses
and jitted steps (`steps`), checkpoints (`checkpoints`) and metrics records (`metrics`)."""

from seqlab.training.checkpoints import Checkpoints, restore_model
from seqlab.training.metrics import MetricsLogger, load_metrics, metrics_table

__all__ = ["Checkpoints", "MetricsLogger", "load_metrics", "metrics_table", "restore_model"]
