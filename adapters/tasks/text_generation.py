"""Text generation: a tenant's LoRA on a frozen causal language model (SmolLM2 by default).

The task kind (``adapters.tasks.kind.TaskKind``) of chat and completion adapters. Requests carry
chat ``messages`` (or a prompt); an adapter is LoRA weights alone, on the decoder's linear layers
(attention q/k/v/o, MLP gate/up/down): no labels, no head (``adapters.tasks.HEADLESS_TASKS``).
peft exports are ``CAUSAL_LM`` adapters over plain ``nn.Linear`` layers.

Datasets (OpenAI's fine-tuning ``{"messages": [...]}`` or ``{"prompt", "completion"}`` JSON Lines)
and training live in ``adapters.generation.datasets`` and ``adapters.training.generation_task``;
this module only names them, imported on first use (a classification job imports neither).

Serving is not a ``TaskServing``: generation is autoregressive and served by
``adapters.generation.engine.GenerationEngine`` (continuous batching over a KV cache), not by the
classification ``Engine``'s one-forward-per-batch path; ``serving`` says so with a ``TypeError``.
"""

from __future__ import annotations

from typing import Any

from adapters.tasks import TEXT_GENERATION
from adapters.tasks.kind import TaskTrainer

name = TEXT_GENERATION
input_field = "messages"
peft_task_type: str | None = "CAUSAL_LM"
lora_kernel: tuple[int, ...] = ()


def default_dataset_limits() -> Any:
    """``adapters.generation.datasets``' default limits."""
    from adapters.generation import datasets

    return datasets.default_dataset_limits()


def parse_dataset(data: bytes, *, format: str | None = None, limits: Any = None,
                  what: str = "training file") -> Any:
    """``adapters.generation.datasets.parse_dataset``: chat or prompt/completion JSON Lines."""
    from adapters.generation import datasets

    return datasets.parse_dataset(data, format=format, limits=limits or default_dataset_limits(), what=what)


def trainer() -> TaskTrainer:
    """``adapters.training.generation_trainer``'s trainer (its settings parse without the training code)."""
    from adapters.training import generation_trainer

    return generation_trainer.trainer()


def serving(base: Any) -> Any:
    raise TypeError("text-generation is served by adapters.generation.engine.GenerationEngine, "
                    "not by the classification Engine")
