"""Training: hyper-parameters, the shared loop and its task seam, text and image tasks,
divergence checks, checkpoints and metrics."""

from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.errors import TrainingCancelled, TrainingDiverged, TrainingYielded
from adapters.training.hyperparams import Hyperparameters, HyperparameterError, ResolvedHyperparameters
from adapters.training.trainer import train

__all__ = [
    "HyperparameterError", "Hyperparameters", "ResolvedHyperparameters", "TrainCallbacks", "TrainResult",
    "TrainingCancelled", "TrainingDiverged", "TrainingYielded", "train",
]
