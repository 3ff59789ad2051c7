"""Training hyper-parameters: each may be ``"auto"``, resolved from the data size and method.

Auto choices (measured on MiniLM, CPU): LoRA r=8, alpha=16, dropout 0.1 at lr 1e-3 on every
linear layer of the encoder (query, key, value and the "dense" projections: 1.5% of MiniLM's
parameters, 1.4 MB per adapter). On BBC News it matched full fine-tuning (0.971 both) where
query/value alone (0.33%, 0.3 MB) reached 0.958 at lr 1e-3 and 0.967 at 2e-3; on IMDB it was
0.815 against full's 0.812 (bench/results/quality-*.json). Tenants who need the smallest
adapters ask for ``target_modules: ["query", "value"]``. r=16 on all of them at lr 2e-3
collapsed to one label in an unrecorded run: divergence detection guards the auto values. Full
fine-tuning wants ~5e-5; a head on frozen features wants a larger rate (5e-3). Epochs aim at
~600 optimizer steps, clamped to 2..30 (5..30 for the cheap head-only method), which covers
50 to 50,000 examples: tiny sets get many passes, large ones two. The cap is 30, not 10,
because small sets need the steps: MiniLM LoRA at lr 1e-3 on 50 IMDB reviews (4 steps an
epoch) predicted one label for the first 7 epochs and reached 0.70 only by epoch ~26, and on
50 BBC articles left single-label predictions only at epoch 7 -- ten epochs (40 steps) learn
nothing. Patience (early stopping on validation accuracy) is a quarter of the epochs, at
least 2, so short noisy epochs of a small set do not stop a run that is still learning.
Batch 16 (32 from 5,000 examples), warmup 6% of steps, weight decay 0.01; lora_alpha follows
2 * lora_r. ``max_length`` follows the training texts (``auto_max_length``): 128 tokens where
nearly all of them fit in it, else the longest the base was trained at (MiniLM: 256).
Resolved examples: 50 -> 30 epochs x 4 steps; 500 -> 19 x 32; 5,000 -> 4 x 157; 50,000 -> 2 x
1,563.

LoRA's learning-rate split and scaling: ``head_lr_scale`` (the new head's rate over
``learning_rate``), ``lora_plus_ratio`` (LoRA+: lora_B's rate over lora_A's) and ``use_rslora``
(scale alpha / sqrt(r)); auto values ``HEAD_LR_SCALE`` (``HEAD_LR_SCALE_SMALL``, 10, for LoRA
on at most ``SMALL_SET`` examples), ``LORA_PLUS_RATIO`` and False, with what was measured for
them at those constants. None changes the adapter's size or serving cost.

``search`` (``"auto"``, true or false): successive halving over learning rate x rank
(``adapters.training.search``) picks whichever of ``learning_rate`` and ``lora_r`` are still
``"auto"`` (``lora_alpha`` follows the rank when it is auto too); given explicitly, a field is
never searched. ``search: true`` turns it on; ``"auto"`` leaves it off (``AUTO_SEARCH``: on two
quick sets it did not pay, see there); with ``AUTO_SEARCH`` the rule is: LoRA runs of at most
``SEARCH_MAX_EXAMPLES`` (1,000) training examples, which the epoch rule gives 10 to 30 epochs
of ~600 steps, where the search costs at most 2 plain runs (1.73x at 30 epochs). Runs of under
``SEARCH_MIN_EPOCHS`` epochs never search (an explicit ``search: true`` there is an error).

``solver`` (``"auto"``, ``"adamw"`` or ``"lbfgs"``): how the ``head`` method fits its head.
``lbfgs`` (what ``"auto"`` gives it unless a step field -- ``epochs``, ``batch_size``,
``learning_rate``, ``warmup_ratio``, ``patience`` -- is set) fits an L2-penalised logistic
regression on the frozen features in closed form, the penalty chosen by cross-validation on
the training rows (``adapters.training.linear_probe``); ``adamw`` trains it in the loop's epochs,
as every other method does. ``lbfgs`` with another method is an error.

``head_init`` (``"auto"``, ``"random"`` or ``"probe"``): how a lora or full run's new head
starts. ``probe`` fits it first, in closed form, on the features the untrained model gives the
training texts (``linear_probe``, as the head method's ``lbfgs`` solver does; LP-FT, Kumar et al.
2022), so the body trains under a head that already separates the labels rather than under a
random one whose gradients carry little; the text task keeps the random head, with a warning,
where the model's own dropout would make that head worse than guessing (``text_task``). Auto:
``HEAD_INIT`` per method. ``probe`` with the head method is an error (it fits its head alone).

Every explicit value is checked on construction (``Hyperparameters(...)`` or ``from_dict``):
a wrong type, a value out of range or an unknown field raises ``HyperparameterError`` (a
``ValueError``) whose ``param`` is ``hyperparameters.<field>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from typing import Any, TypeVar

from adapters.errors import TailorError
from adapters.strict import is_number, is_whole, known_items

AUTO = "auto"
LR = {"lora": 1e-3, "head": 5e-3, "full": 5e-5}
AUTO_TARGETS = ("query", "key", "value", "dense")  # every linear layer of a BERT-family encoder
# auto: the head's rate over the LoRA rate. x10 measured (bench/results/quality-issue13-head-lr.json,
# --quick, 8 epochs, seeds 0-1): tweets +1.7 points (0.632 -> 0.649), rotten -0.25 (0.695 -> 0.693);
# not better on every set and rotten loses more than its standard error, so 1 stays (drugs, a third
# seed and full sizes not run). Full size (bench/results/pieces/quality-*-head10-*.json): drugs seed 0
# 0.712 (plain 0.698), at 256 tokens 0.717 (plain 0.542: one label throughout); rotten seeds 0/2
# 0.812/0.807 (plain 0.822/0.825); tweets seed 0 0.778 (0.780): it helps the small set's slow start
# and costs the large sets, so 1 stays for them
HEAD_LR_SCALE = 1.0
# ... except on smaller sets: HEAD_LR_SCALE_SMALL for LoRA runs of at most SMALL_SET examples (the
# epoch rule gives them 5-30 epochs). Measured (pieces bench/results/pieces/
# quality-*-{n600-,}head10-*.json, one thread): rotten and tweets cut to 540 training rows, seeds
# 0 / 1: 0.730 / 0.717 -> 0.767 / 0.770 and 0.699 / 0.690 -> 0.705 / 0.708; drugs (540 rows, 64% one label), where plain LoRA sat on
# one-label predictions for 8 epochs on every seed (at 256 tokens seed 0 never left them):
# x10 leaves them by epoch 4; at 256 tokens (its auto length) seeds 0-2 0.717 / 0.712 / 0.738,
# mean 0.722, against plain 0.542 / 0.733 / 0.669 (0.648) and full fine-tuning 0.726 (3 seeds);
# at 128, seed 0 0.712 vs 0.698. On 3,600 rows (3 epochs) x10 cost rotten 1-2 points (above), so
# larger sets keep 1. At 1,800 rows (pieces quality-{tweets,rotten}-n2000-*, quality-imdb-len256-*)
# x10 gained in the mean on every set measured: tweets seeds 0-2 0.740 / 0.749 / 0.751 -> 0.756 /
# 0.759 / 0.740 (+0.5), rotten seeds 0-1 0.790 / 0.803 -> 0.787 / 0.812 (+0.3), IMDB at 256 tokens
# seeds 0-1 0.866 / 0.860 -> 0.887 / 0.872 (+1.7; seed 2 0.872 -> 0.885, x10's mean 0.881 = full
# fine-tuning's 0.881): so the boundary sits at 2,000. BBC's 1,103 rows fall under it: at 256
# tokens x10 0.974 / 0.969 / 0.972 (x1 seed 0: 0.971), full fine-tuning 0.973 (3 seeds).
HEAD_LR_SCALE_SMALL = 10.0
SMALL_SET = 2000
LORA_PLUS_RATIO = 1.0  # auto: lora_B's rate over lora_A's
# auto head_init per method: "probe" fits the new head on the frozen base's features (the
# linear_probe, C by cross-validation) before the first step (LP-FT, Kumar et al. 2022). Measured
# for lora (bench/results/pieces/quality-{drugs,rotten}-lpft*-0.json, full size, seed 0): it ends
# drugs' 8-epoch one-label plateau at once, but overfits within 1-2 epochs and scored below the
# random start: drugs 0.667 (lr 3e-4: 0.675) vs 0.698, rotten 0.789 (3e-4: 0.812) vs 0.822
HEAD_INIT = {"lora": "random", "full": "random"}
# "auto" search is off: measured (bench/results/quality-issue13-quick.json: 270 training, 30
# validation rows, 8 epochs, one seed) it chose lr 2e-3 on tweets and scored 0.592 against the
# plain run's 0.627, and 0.700 against 0.695 on rotten, at 1.75x the steps: selecting on a few
# dozen validation rows did not pay. Set True to turn the rule below on for every auto run.
AUTO_SEARCH = False
SEARCH_MAX_EXAMPLES = 1000  # auto search (when AUTO_SEARCH): on up to this many training examples
SEARCH_MIN_EPOCHS = 6  # and for runs of at least this many epochs (its budget: <= 2 plain runs)
SEARCHED = ("learning_rate", "lora_r")  # what the search may choose, each only when "auto"


# auto max_length: MAX_LENGTH_SHORT tokens when at least LENGTH_QUANTILE of the training texts fit
# in it, else the base's length cap (BaseModel.length_cap: MiniLM's 256). Two values, not a
# quantile of the lengths: every trained method gained from the longer length where many texts
# were cut (pieces bench/results/pieces/quality-{imdb,drugs}-len256-*.json; IMDB, 87% of its texts
# over 128 tokens, 40% over 256: head 0.792 -> 0.839, lora 0.815 -> 0.866, full 0.812 -> 0.888;
# drugs, 42% over 128, 0.3% over 256: full 0.692 -> 0.726, head 0.690 -> 0.696, lora 0.687 ->
# 0.722 with the small-set head rate below, which its slow start at 256 needs), and short texts
# are not cut at 128 (tweets and rotten: 95% under 53 tokens), where a batch is trimmed to its
# longest text anyway, so the floor costs nothing. Serving splits a mixed batch by width
# (runtime.width_groups), so a long-text tenant's rows do not make other tenants' dearer.
MAX_LENGTH_SHORT = 128
LENGTH_QUANTILE = 0.95


def auto_max_length(lengths: Sequence[int], cap: int) -> int:
    """``MAX_LENGTH_SHORT`` when at least ``LENGTH_QUANTILE`` of ``lengths`` (token counts) are
    at most that, else ``cap``; never above ``cap``."""
    short = min(MAX_LENGTH_SHORT, cap)
    if not lengths:
        return short
    fit = sum(1 for n in lengths if n <= short) / len(lengths)
    return short if fit >= LENGTH_QUANTILE else cap


class HyperparameterError(TailorError, ValueError):
    code = "invalid_hyperparameters"


# Every task's settings share the fields below, in this order: the schedule (``epochs`` ..
# ``warmup_ratio``), ``max_length`` where the task has tokens (text, generation; not images), then
# the seed, patience and LoRA fields; each task adds its own after them. A task's class lists
# its bases last-first: dataclasses take inherited fields from the last base to the first.


@dataclass(frozen=True)
class ResolvedSchedule:
    """The resolved schedule fields every task has (``task_hooks.LoopSettings`` reads them)."""

    epochs: int
    batch_size: int
    learning_rate: float
    weight_decay: float
    warmup_ratio: float

    def to_dict(self) -> dict[str, Any]:
        """A JSON object: tuples (``target_modules``, ``search``) as lists."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


@dataclass(frozen=True)
class ResolvedTokens(ResolvedSchedule):
    max_length: int


@dataclass(frozen=True)
class ResolvedLora:
    """The resolved seed, patience and LoRA fields every task has."""

    seed: int
    patience: int
    lora_r: int
    lora_alpha: float
    lora_dropout: float
    target_modules: tuple[str, ...]


@dataclass(frozen=True)
class ResolvedHyperparameters(ResolvedLora, ResolvedTokens):
    head_lr_scale: float = 1.0  # the new head's rate over learning_rate (LoRA method)
    lora_plus_ratio: float = 1.0  # LoRA+: lora_B's rate over lora_A's
    use_rslora: bool = False  # scale alpha / sqrt(r) instead of alpha / r
    search: tuple[str, ...] = ()  # fields the search picks (adapters.training.search); () = none
    solver: str = "adamw"  # the head method: "adamw" (epochs of steps) or "lbfgs" (adapters.training.linear_probe)
    head_init: str = "random"  # lora/full: the new head "random" or fitted by "probe" before the first step


# field -> (type, lower bound, upper bound)
_RULES: dict[str, tuple[type, float, float]] = {
    "epochs": (int, 1, 100), "batch_size": (int, 1, 512), "learning_rate": (float, 1e-8, 1.0),
    "weight_decay": (float, 0.0, 1.0), "warmup_ratio": (float, 0.0, 0.5), "max_length": (int, 8, 512),
    "seed": (int, 0, 2**31 - 1), "patience": (int, 1, 100), "lora_r": (int, 1, 256),
    "lora_alpha": (float, 1e-3, 4096.0), "lora_dropout": (float, 0.0, 0.9),
    "head_lr_scale": (float, 0.01, 1000.0), "lora_plus_ratio": (float, 0.01, 1000.0),
}
_BOOLS = ("use_rslora", "search")
SOLVERS = ("adamw", "lbfgs")
HEAD_INITS = ("random", "probe")
# what "auto" leaves the lbfgs solver to: set explicitly, any of them asks the head for AdamW's epochs
_STEP_FIELDS = ("epochs", "batch_size", "learning_rate", "warmup_ratio", "patience")


class RequestedSettings:
    """What every task's requested hyper-parameters (a frozen dataclass of fields that may be
    ``"auto"``, ``target_modules`` among them) share: read from and written to JSON objects,
    every field checked on construction (``_checked``)."""

    @classmethod
    def from_dict(cls: type[_S], d: dict[str, Any] | None) -> _S:
        return cls(**dict(known_items(d, cls, what="hyperparameters", noun="hyperparameter",
                                      error=HyperparameterError, sort_known=True, any_key_in_param=True)))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)  # type: ignore[call-overload]
        if isinstance(d.get("target_modules"), tuple):
            d["target_modules"] = list(d["target_modules"])
        return d

    def __post_init__(self) -> None:
        for f in fields(self):  # type: ignore[arg-type]
            object.__setattr__(self, f.name, self._checked(f.name, getattr(self, f.name)))

    def _checked(self, key: str, value: Any) -> Any:
        """``value`` for field ``key``, checked and normalised (``HyperparameterError`` if it is
        not allowed); a task with fields of its own, or other limits, overrides it."""
        return _check(key, value)

    def _or(self, name: str, default: Any) -> Any:
        value = getattr(self, name)
        return default if isinstance(value, str) and value == AUTO else value


_S = TypeVar("_S", bound=RequestedSettings)


@dataclass(frozen=True)
class ScheduleSettings(RequestedSettings):
    """The requested schedule fields every task has (the ``Resolved*`` classes' order)."""

    epochs: int | str = AUTO
    batch_size: int | str = AUTO
    learning_rate: float | str = AUTO
    weight_decay: float | str = AUTO
    warmup_ratio: float | str = AUTO


@dataclass(frozen=True)
class TokenSettings(ScheduleSettings):
    max_length: int | str = AUTO


@dataclass(frozen=True)
class LoraFields:
    """The requested seed, patience and LoRA fields every task has."""

    seed: int | str = 0
    patience: int | str = AUTO
    lora_r: int | str = AUTO
    lora_alpha: float | str = AUTO
    lora_dropout: float | str = AUTO
    target_modules: tuple[str, ...] | str = AUTO


@dataclass(frozen=True)
class Hyperparameters(LoraFields, TokenSettings):
    """What a client asks for; every field may be ``"auto"``. Values are checked (and ints/floats
    normalised, ``target_modules`` made a tuple) on construction, so an instance is always valid."""

    head_lr_scale: float | str = AUTO
    lora_plus_ratio: float | str = AUTO
    use_rslora: bool | str = AUTO
    search: bool | str = AUTO
    solver: str = AUTO
    head_init: str = AUTO

    def _checked(self, key: str, value: Any) -> Any:
        choices = {"solver": SOLVERS, "head_init": HEAD_INITS}.get(key)
        if choices is not None:
            if value != AUTO and value not in choices:
                raise HyperparameterError(f"{key} must be \"auto\", {' or '.join(map(repr, choices))}, got {value!r}",
                                          param=f"hyperparameters.{key}")
            return value
        return _check(key, value)

    def resolve(self, n_train: int, method: str, device: object = None, *,
                lengths: Sequence[int] | None = None, cap: int | None = None) -> ResolvedHyperparameters:
        """Concrete values for ``n_train`` examples (``device`` is accepted for future tuning;
        the auto values are CPU-safe everywhere). ``lengths``: the training texts' token counts,
        from which an auto ``max_length`` is chosen up to ``cap`` (``auto_max_length``); without
        them it is ``MAX_LENGTH_SHORT``."""
        if method not in LR:
            raise HyperparameterError(f"method must be one of {', '.join(LR)}, got {method!r}", param="method")
        batch = self._or("batch_size", 16 if n_train < 5000 else 32)
        steps_per_epoch = max(1, math.ceil(n_train / batch))
        lo, hi = (5, 30) if method == "head" else (2, 30)
        r = self._or("lora_r", 8)
        epochs = self._or("epochs", min(hi, max(lo, round(600 / steps_per_epoch))))
        return ResolvedHyperparameters(
            epochs=epochs,
            batch_size=batch, learning_rate=float(self._or("learning_rate", LR[method])),
            weight_decay=float(self._or("weight_decay", 0.01)), warmup_ratio=float(self._or("warmup_ratio", 0.06)),
            max_length=self._or("max_length", MAX_LENGTH_SHORT if lengths is None or cap is None
                                else auto_max_length(lengths, cap)), seed=self._or("seed", 0),
            patience=self._or("patience", max(2, epochs // 4)),
            lora_r=r, lora_alpha=float(self._or("lora_alpha", 2 * r)),
            lora_dropout=float(self._or("lora_dropout", 0.1)),
            target_modules=tuple(self._or("target_modules", AUTO_TARGETS)),
            head_lr_scale=float(self._or("head_lr_scale", HEAD_LR_SCALE_SMALL
                                         if method == "lora" and n_train <= SMALL_SET else HEAD_LR_SCALE)),
            lora_plus_ratio=float(self._or("lora_plus_ratio", LORA_PLUS_RATIO)),
            use_rslora=bool(self._or("use_rslora", False)),
            search=self._search_fields(n_train, method, epochs),
            solver=self._solver(method),
            head_init=self._head_init(method),
        )

    def _head_init(self, method: str) -> str:
        """``HEAD_INIT[method]`` when auto; ``probe`` only where a head trains with a body (lora,
        full): the head method fits its head (``solver``)."""
        if self.head_init == "probe" and method == "head":
            raise HyperparameterError("head_init probe starts a lora or full run's head; the head method fits its "
                                      "head alone (solver lbfgs)", param="hyperparameters.head_init")
        return HEAD_INIT.get(method, "random") if self.head_init == AUTO else self.head_init

    def _solver(self, method: str) -> str:
        """``lbfgs`` for the head method unless a step field (``_STEP_FIELDS``) is set; only the
        head method may ask for it."""
        if self.solver == "lbfgs" and method != "head":
            raise HyperparameterError(f"solver lbfgs fits the head method's head alone; this run is {method}",
                                      param="hyperparameters.solver")
        if self.solver != AUTO:
            return self.solver
        steps_asked = any(getattr(self, f) != AUTO for f in _STEP_FIELDS)
        return "lbfgs" if method == "head" and not steps_asked else "adamw"

    def _search_fields(self, n_train: int, method: str, epochs: int) -> tuple[str, ...]:
        """What the search picks: the auto ones of ``SEARCHED`` for a LoRA run, when ``search``
        is true, or "auto" and the training set has at most ``SEARCH_MAX_EXAMPLES`` examples;
        nothing for a run of under ``SEARCH_MIN_EPOCHS`` epochs (its budget would pass two plain
        runs), where an explicit ``search: true`` is an error, as it is for another method."""
        if self.search is True and (method != "lora" or epochs < SEARCH_MIN_EPOCHS):
            raise HyperparameterError(
                f"search needs method lora and at least {SEARCH_MIN_EPOCHS} epochs; this run is {method} "
                f"with {epochs} epochs (set epochs, or leave search \"auto\")", param="hyperparameters.search")
        on = self.search if isinstance(self.search, bool) else AUTO_SEARCH and n_train <= SEARCH_MAX_EXAMPLES
        if method != "lora" or not on or epochs < SEARCH_MIN_EPOCHS:
            return ()
        chosen = tuple(f for f in SEARCHED if getattr(self, f) == AUTO)
        if "lora_r" in chosen and self.lora_alpha == AUTO:
            chosen += ("lora_alpha",)  # it follows the rank the search picks (2 * r)
        return chosen


def _check(key: str, value: Any) -> Any:
    if isinstance(value, str) and value == AUTO:
        return value
    if key in _BOOLS:
        if not isinstance(value, bool):
            raise HyperparameterError(f"{key} must be \"auto\", true or false, got {value!r}",
                                      param=f"hyperparameters.{key}")
        return value
    if key == "target_modules":
        ok = isinstance(value, (list, tuple)) and value and all(
            isinstance(v, str) and v.replace(".", "").replace("_", "").isalnum() for v in value)
        if not ok:
            raise HyperparameterError("target_modules must be \"auto\" or a non-empty list of module names "
                                      "such as [\"query\", \"value\"]", param="hyperparameters.target_modules")
        return tuple(value)
    kind, lo, hi = _RULES[key]
    if not is_number(value) or (kind is int and not is_whole(value)):
        raise HyperparameterError(f"{key} must be \"auto\" or {'an integer' if kind is int else 'a number'}, "
                                  f"got {value!r}", param=f"hyperparameters.{key}")
    if not (lo <= value <= hi) or (isinstance(value, float) and not math.isfinite(value)):
        raise HyperparameterError(f"{key} must be between {lo:g} and {hi:g}, got {value!r}",
                                  param=f"hyperparameters.{key}")
    return kind(value)
