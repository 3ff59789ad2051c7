"""Training: hyper-parameters, the trainer, checkpoints and metrics."""

from adapters.training.hyperparams import Hyperparameters, HyperparameterError, ResolvedHyperparameters
from adapters.training.trainer import (
    TrainCallbacks, TrainingCancelled, TrainingDiverged, TrainResult, train,
)

__all__ = [
    "HyperparameterError", "Hyperparameters", "ResolvedHyperparameters", "TrainCallbacks", "TrainResult",
    "TrainingCancelled", "TrainingDiverged", "train",
]
