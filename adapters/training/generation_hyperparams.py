"""Hyper-parameters of a text-generation run: each may be ``"auto"``, resolved from the data size and the base.

The fields mean what they mean for text classification (``adapters.training.hyperparams``,
checked by the same rules); ``max_length`` is the longest example in tokens after the chat
template (an example over it is refused, naming its line: never truncated, which would cut the
answer the loss is on). Only ``method="lora"`` trains generation adapters (a generation adapter
has no head, and full fine-tuning produces no adapter).

Auto values and why:

* LoRA r=8, alpha 16, dropout 0.05 on every linear layer of the decoder (``AUTO_TARGETS``: the
  attention q/k/v/o and MLP gate/up/down projections: on SmolLM2-135M 2.44 M parameters, 1.8% of
  the base, ~9.8 MB per adapter in fp32). All-linear LoRA is what QLoRA found necessary to match
  full fine-tuning on chat data; attention-only LoRA learns formats more slowly.
* Learning rate 1e-3 under 1,000 training examples, 5e-4 from 1,000 and 2e-4 from 10,000 (AdamW,
  warmup 6%, linear decay, weight decay 0). LoRA on small decoders tolerates 1e-3 for short
  runs; long runs on many examples want a smaller rate for the same total update.
* Batch 8 under 1,000 training examples, 16 above (padded per batch to its longest example:
  short chats cost little), smaller for the smallest sets so that a run makes at least
  ``MIN_STEPS`` optimizer steps over ``MAX_EPOCHS`` epochs (``batch <= n_train * MAX_EPOCHS /
  MIN_STEPS``, at least 2). Epochs aim at ~``TARGET_STEPS`` optimizer steps, clamped to
  1..``MAX_EPOCHS``. What a job gets (it holds out 20% under 500 examples, 10% from 500;
  ``plan`` computes it, tests/test_generation_training.py checks the table):

  ==========  =======  =====  ======  =====  ======  ===========
  examples    train    batch  epochs  steps  lr      examples seen
  ==========  =======  =====  ======  =====  ======  ===========
  50          40       4      10      100    1e-3    400
  500         450      8      5       285    1e-3    2,250
  5,000       4,500    16     1       282    5e-4    4,500
  20,000      18,000   16     1       1,125  2e-4    18,000
  ==========  =======  =====  ======  =====  ======  ===========

  Training time follows the examples seen (a step's cost grows with its batch): 45x from 50
  to 20,000 examples for 400x the data. Steps stay near ``TARGET_STEPS`` until one epoch holds
  more; from there a run is one pass over the data, so the dataset's ``max_rows`` quota bounds
  it (50,000 rows: 2,813 steps). A chat model over-fits a small set within a few epochs, so
  small sets get more passes but never more than ``MAX_EPOCHS``; early stopping on validation
  loss (patience 2) and the best epoch's weights keep the over-fitted tail out. The lower
  learning rates for big sets keep the total update of a long run near that of a short one.
* ``max_length`` 2048 tokens (the dataset limit's default), capped at the base's context.

These are the usual LoRA fine-tuning values for small instruction models, not a tuned result:
the one measurement so far is ``python -m bench.quality --dataset chatterbot-topics --quick``
(3 epochs instead of the auto 10; bench/results/quality-generation-quick.json), on the shared,
heavily loaded 2-core machine.

Memory is what the batch size really spends: a batch is padded to its longest example, and
training SmolLM2-135M in fp32 on CPU keeps roughly 3 MB of activations per token of the padded
batch (eager attention, LoRA dropout copies of each adapted layer's input). The full-size
chatterbot run (batch 8, chats up to 349 tokens) peaked at 11 GB of RSS. Batch 16 of 2,048-token
examples would need ~100 GB, so a step's batch runs as micro-batches of at most
``token_budget.TOKEN_BUDGET`` (2,048) padded tokens with gradients accumulated
(``adapters.training.token_budget``, run by the loop), and validation forwards keep to the same
budget: the batch size sets the gradient's examples, not the memory.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from adapters.training.hyperparams import (
    AUTO, HyperparameterError, LoraFields, ResolvedLora, ResolvedTokens, TokenSettings, _check,
)

AUTO_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
METHOD = "lora"
TARGET_STEPS = 300
MIN_STEPS = 100  # what the smallest sets still get (smaller batches), 10 examples excepted
MAX_EPOCHS = 10
MAX_LENGTH = 2048


@dataclass(frozen=True)
class ResolvedGenerationHyperparameters(ResolvedLora, ResolvedTokens):
    """The resolved fields of text classification's (``hyperparams``), less its LoRA rate split."""


@dataclass(frozen=True)
class GenerationHyperparameters(LoraFields, TokenSettings):
    """What a client asks for; every field may be ``"auto"``; checked on construction (a
    ``HyperparameterError`` naming ``hyperparameters.<field>``)."""

    def _checked(self, key: str, value: Any) -> Any:
        if key == "max_length" and not (isinstance(value, str) and value == AUTO):
            return _max_length(value)
        return _check(key, value)

    def resolve(self, n_train: int, method: str = METHOD, max_context: int = MAX_LENGTH) \
            -> ResolvedGenerationHyperparameters:
        """Concrete values for ``n_train`` training examples on a base of ``max_context`` tokens."""
        if method != METHOD:
            raise HyperparameterError(f"text-generation adapters train with method 'lora' only, got {method!r}",
                                      param="method")
        batch = self._or("batch_size", auto_batch_size(n_train))
        steps_per_epoch = max(1, math.ceil(n_train / batch))
        epochs = self._or("epochs", min(MAX_EPOCHS, max(1, round(TARGET_STEPS / steps_per_epoch))))
        lr = 1e-3 if n_train < 1000 else 5e-4 if n_train < 10_000 else 2e-4
        max_length = self._or("max_length", min(MAX_LENGTH, max_context))
        if max_length > max_context:
            raise HyperparameterError(f"max_length {max_length} exceeds the base model's {max_context} positions",
                                      param="hyperparameters.max_length")
        r = self._or("lora_r", 8)
        return ResolvedGenerationHyperparameters(
            epochs=epochs, batch_size=batch, learning_rate=float(self._or("learning_rate", lr)),
            weight_decay=float(self._or("weight_decay", 0.0)), warmup_ratio=float(self._or("warmup_ratio", 0.06)),
            max_length=max_length, seed=self._or("seed", 0), patience=self._or("patience", 2),
            lora_r=r, lora_alpha=float(self._or("lora_alpha", 2 * r)),
            lora_dropout=float(self._or("lora_dropout", 0.05)),
            target_modules=tuple(self._or("target_modules", AUTO_TARGETS)),
        )


def auto_batch_size(n_train: int) -> int:
    """8 under 1,000 training examples, 16 from 1,000; smaller where that would give fewer than
    ``MIN_STEPS`` steps in ``MAX_EPOCHS`` epochs (at least 2)."""
    batch = 8 if n_train < 1000 else 16
    return max(2, min(batch, n_train * MAX_EPOCHS // MIN_STEPS))


def total_steps(n_train: int, hp: ResolvedGenerationHyperparameters) -> int:
    """Optimizer steps of a run of ``hp`` over ``n_train`` examples that is not stopped early."""
    return hp.epochs * max(1, math.ceil(n_train / hp.batch_size))


def _max_length(value: Any) -> int:
    """Generation's examples are longer than classification's texts: 8..32768 tokens."""
    if isinstance(value, bool) or not isinstance(value, int) or not 8 <= value <= 32768:
        raise HyperparameterError(f"max_length must be \"auto\" or an integer between 8 and 32768, got {value!r}",
                                  param="hyperparameters.max_length")
    return value
