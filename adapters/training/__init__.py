"""Training: hyper-parameters, the trainer, divergence checks, checkpoints and metrics."""

from adapters.training.errors import TrainingCancelled, TrainingDiverged
from adapters.training.hyperparams import Hyperparameters, HyperparameterError, ResolvedHyperparameters
from adapters.training.trainer import TrainCallbacks, TrainResult, train

__all__ = [
    "HyperparameterError", "Hyperparameters", "ResolvedHyperparameters", "TrainCallbacks", "TrainResult",
    "TrainingCancelled", "TrainingDiverged", "train",
]
