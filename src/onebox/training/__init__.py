"""Training: what a run starts from (`start`), the one builder of a run (`recipe`), the loop (`trainer`)
and what keeps it safe (`guards`)."""

from onebox.training.start import resume_configs
from onebox.training.trainer import Interrupted, NonFiniteLoss, TrainResult, evaluate, train

__all__ = ["Interrupted", "NonFiniteLoss", "TrainResult", "evaluate", "resume_configs", "train"]
