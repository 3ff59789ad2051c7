"""Hyper-parameter search by successive halving: ``search_fit(make_task, hp, ...)``.

What it does (``hp.search`` names the fields it picks: ``learning_rate`` and/or ``lora_r``,
with ``lora_alpha`` following the rank as ``2 * r`` when it is auto too; see
``hyperparams.Hyperparameters``: ``search: true`` turns it on for a LoRA run, "auto" only
where ``AUTO_SEARCH`` says so -- off for now, as measured -- and a field given explicitly is
never searched):

* **Candidates**: the product of ``LR_FACTORS`` times the auto learning rate and
  ``RANKS`` (each only for a searched field): 6 when both are searched, 3 or 2 when one is.
  Ranks stop at the default 8: adapters never grow larger or make mixed batches slower. Every
  candidate is the full run it would be on its own (same epochs, schedule, patience, seed);
  only the searched fields differ.
* **Rungs** (successive halving, ``ETA`` = 3): with ``K = ceil(log3(n))`` rungs for ``n``
  candidates, rung ``k`` trains every survivor up to ``max(1, E // 3**(K - k))`` epochs of its own
  schedule (``E``: the run's epochs), scores it on validation -- its lowest validation loss so
  far, ties to the better accuracy: on validation sets of tens of rows accuracy moves in steps
  of several points, and an early epoch that still predicts one label (a slow start, which the
  loop forgives) has no accuracy worth ranking, while the loss is smooth; measured on tweets,
  ranking by accuracy after one epoch dropped both faster rates for the slowest by chance --
  and keeps the best third (rounded up; only the best after the last rung). Ties go to the
  earlier candidate in the fixed order (middle values first), so
  the choice is a function of the data and the seed only: with the search on, a run is as
  deterministic as one without (CPU). A candidate that diverges or stops early is scored on
  what it reached and trains no further.
* **Continuation**: the last survivor is *continued*, not retrained: its checkpoint (the
  loop's yield/resume, exact on CPU) is resumed to the end of its schedule with the caller's
  callbacks and checkpoint folder (progress, fair-share yields and shared checkpoints work as
  in a plain run). So the result equals a plain run with the chosen values.
* **Budget**: the search trains at most ``plan.budget_steps`` optimizer steps in all
  (``budget_epochs`` x steps per epoch), at most twice a plain run's ``E`` for the ``E >= 6`` it
  needs (``hyperparams.SEARCH_MIN_EPOCHS``); e.g. 6 candidates, ``E`` = 30: 6 x 3 + 2 x 7 + 1 x
  20 = 52 epochs, 1.73x; ``E`` = 10: 17, 1.7x; ``E`` = 6: 12, 2x. Fewer when candidates stop
  early. Its exploration (every candidate's training before the winner's continuation) also has
  a wall-clock budget, ``plan.budget_seconds`` (``MAX_SECONDS``, or ``search_fit(max_seconds=)``):
  once spent, a candidate in training stops before its next step (its checkpoint keeps its
  place), no other candidate starts, and the best so far by the ranking above (one with no
  validated epoch ranks last) is continued to its end. The choice is then a function of the
  machine's speed too; determinism for a seed holds for searches inside their time budget.
  No yield to other tenants happens inside the exploration (the final continuation yields as
  usual); a cancel (``should_stop``, polled before every step) stops it at once.
* **Events** (``TrainCallbacks.on_search``, JSON-able dicts, told as they happen; a job writes
  each to its events as it comes, ``describe`` gives the line): ``{"stage": "plan", ...}`` with the
  candidates and the budget (``budget_steps``, ``budget_seconds``); for every candidate trained
  in a rung ``{"stage": "candidate_start", "rung", "name", <values>, "from_epoch", "to_epoch",
  ...}`` and ``{"stage": "candidate_end", "rung", "name", <values>, "epochs", "val_loss",
  "val_accuracy", "steps", "seconds", ["stopped": early|diverged], ["cut": "time budget"], ...}``,
  both with ``steps_so_far`` / ``seconds_so_far`` of the whole search and the budget; one
  ``{"stage": "rung", ...}`` per rung with every survivor's epochs, validation accuracy and loss
  and who goes on (``stopped_by: "time budget"`` when it ended the exploration); ``{"stage":
  "continuing", "chosen", "values", "from_epoch", "to_epoch", ...}`` before the winner's
  continuation (the caller's own step and epoch callbacks follow); then ``{"stage": "chosen",
  ...}`` with the winner, every candidate's report and the total compute: ``steps``, ``seconds``
  (continuation included) and ``search_seconds`` (the exploration alone). A job resumed after its
  search ended (its checkpoint folder holds a candidate's checkpoint) skips the search:
  ``{"stage": "resumed", ...}``.

Candidates train in ``<checkpoint_dir>/search/<i>`` (a temporary folder without one), wiped
when a search starts so an interrupted search reruns from scratch, identically.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapters.training import checkpoint
from adapters.training.callbacks import TrainCallbacks, TrainResult
from adapters.training.errors import TrainingDiverged, TrainingYielded
from adapters.training.hyperparams import ResolvedHyperparameters
from adapters.training.loop import fit
from adapters.training.task_hooks import TrainingTask

LR_FACTORS = (1.0, 0.5, 2.0)  # times the auto learning rate; middle first (ties keep it)
# never above the default 8: the engine pads every resident slot to the largest rank in the
# stack, so one tenant's r=16 would make every tenant's mixed batch pay for 16
RANKS = (8, 4)
ETA = 3  # successive halving keeps the best 1/ETA at each rung
SEARCH_DIR = "search"
# wall-clock budget of the exploration (every candidate's training before the winner's
# continuation); search_fit(max_seconds=...) overrides it. On this 2-core CPU a 1,000-example
# search of short texts explores for well under this; a slower machine or longer texts end the
# exploration early, with the best candidate so far continued.
MAX_SECONDS = 3600.0


@dataclass(frozen=True)
class Candidate:
    index: int
    values: dict[str, Any]  # the searched fields' values
    hp: ResolvedHyperparameters  # the full run it stands for (search=())

    @property
    def name(self) -> str:
        short = {"learning_rate": "lr", "lora_r": "r"}
        return ",".join(f"{short[k]}={v:g}" for k, v in self.values.items() if k in short)


def survivors(alive: int, rung: int, n_rungs: int) -> int:
    """How many go on after search rung ``rung``: the best third, and one after the last."""
    return 1 if rung >= n_rungs - 2 else max(1, math.ceil(alive / ETA))


@dataclass(frozen=True)
class SearchPlan:
    candidates: list[Candidate]
    rungs: list[int]  # epochs each rung trains survivors up to; the last is the run's epochs
    steps_per_epoch: int
    budget_seconds: float = MAX_SECONDS  # of exploration: the winner's continuation is not cut

    @property
    def budget_epochs(self) -> int:
        """Epochs trained when no candidate stops early: survivors x new epochs, per rung."""
        alive, done, total = len(self.candidates), 0, 0
        for i, epochs in enumerate(self.rungs):
            total += alive * (epochs - done)
            alive, done = survivors(alive, i, len(self.rungs)), epochs
        return total

    @property
    def budget_steps(self) -> int:
        return self.budget_epochs * self.steps_per_epoch

    def to_dict(self) -> dict[str, Any]:
        e = self.rungs[-1]
        return {"candidates": [{"name": c.name, **c.values} for c in self.candidates], "rung_epochs": self.rungs,
                "budget_epochs": self.budget_epochs, "budget_steps": self.budget_steps,
                "plain_run_steps": e * self.steps_per_epoch,
                "budget_vs_plain_run": round(self.budget_epochs / e, 3), "budget_seconds": self.budget_seconds}


def plan(hp: ResolvedHyperparameters, n_train: int, max_seconds: float = MAX_SECONDS) -> SearchPlan:
    """The candidates and rungs for ``hp.search`` (a ``ValueError`` if it names nothing to pick)."""
    if not hp.search:
        raise ValueError("no hyper-parameter is left to search (hp.search is empty)")
    lrs = [hp.learning_rate * f for f in LR_FACTORS] if "learning_rate" in hp.search else [hp.learning_rate]
    ranks = list(RANKS) if "lora_r" in hp.search else [hp.lora_r]
    candidates = []
    for r in ranks:
        for lr in lrs:
            values: dict[str, Any] = {}
            if "learning_rate" in hp.search:
                values["learning_rate"] = lr
            if "lora_r" in hp.search:
                values["lora_r"] = r
            if "lora_alpha" in hp.search:
                values["lora_alpha"] = float(2 * r)
            candidates.append(Candidate(len(candidates), values, replace(hp, search=(), **values)))
    k = math.ceil(math.log(len(candidates), ETA) - 1e-9) if len(candidates) > 1 else 0
    rungs = sorted({max(1, hp.epochs // ETA ** (k - i)) for i in range(k)} | {hp.epochs})
    return SearchPlan(candidates, rungs, max(1, math.ceil(n_train / hp.batch_size)), float(max_seconds))


@dataclass
class _Run:
    cand: Candidate
    folder: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    result: TrainResult | None = None  # set once it ran to its end (or stopped early)
    failed: str | None = None  # diverged with no healthy epoch
    steps: int = 0  # optimizer steps trained so far (a cut candidate's stop inside an epoch included)

    @property
    def epochs(self) -> int:
        return self.history[-1]["epoch"] if self.history else 0

    @property
    def finished(self) -> bool:
        return self.result is not None or self.failed is not None

    def score(self) -> tuple[float, float]:
        """(minus its lowest validation loss so far, its best healthy validation accuracy); a
        candidate with no validated epoch yet ranks last."""
        if not self.history:  # diverged before its first validation, or cut by the time budget
            return (-math.inf, -1.0)
        loss = min(h["val_loss"] for h in self.history)
        healthy = [h["val_accuracy"] for h in self.history if not h.get("collapsed")]
        return (-round(loss, 6), max(healthy) if healthy else -1.0)

    def report(self) -> dict[str, Any]:
        loss, acc = self.score()
        return {"name": self.cand.name, **self.cand.values, "epochs": self.epochs,
                "val_loss": -loss if math.isfinite(loss) else None, "val_accuracy": acc if acc >= 0 else None,
                **({"stopped": "early" if self.result is not None else "diverged"} if self.finished else {})}


def search_fit(make_task: Callable[[ResolvedHyperparameters], TrainingTask], hp: ResolvedHyperparameters,
               n_train: int, *, callbacks: TrainCallbacks | None = None, checkpoint_dir: Path | None = None,
               threads: int | None = None, max_seconds: float = MAX_SECONDS,
               clock: Callable[[], float] = time.perf_counter) -> TrainResult:
    """Pick ``hp.search``'s fields by successive halving and train the winner to its end (see the
    module docstring); the result is the winner's, with ``metrics["search"]`` describing the search.
    ``clock`` (seconds) measures the time budget and the seconds reported."""
    cb = callbacks or TrainCallbacks()
    p = plan(hp, n_train, max_seconds)
    tell = cb.on_search or (lambda record: None)
    if checkpoint_dir is not None:
        resumed = _resumed(p, make_task, checkpoint_dir)
        if resumed is not None:
            tell({"stage": "resumed", "chosen": resumed.name, "values": resumed.values})
            result = fit(make_task(resumed.hp), resumed.hp, callbacks=cb, checkpoint_dir=checkpoint_dir,
                         threads=threads)
            result.metrics["search"] = {"resumed": True, "chosen": resumed.name, "values": resumed.values}
            return result
    with tempfile.TemporaryDirectory(prefix="tailor-search-") as tmp:
        root = (checkpoint_dir / SEARCH_DIR) if checkpoint_dir is not None else Path(tmp)
        shutil.rmtree(root, ignore_errors=True)  # an interrupted search reruns from scratch
        return _Search(p, make_task, cb, root, threads, tell, clock).run(hp, checkpoint_dir)


class _Search:
    def __init__(self, p: SearchPlan, make_task: Callable[[ResolvedHyperparameters], TrainingTask],
                 cb: TrainCallbacks, root: Path, threads: int | None, tell: Callable[[dict[str, Any]], None],
                 clock: Callable[[], float]) -> None:
        self.plan, self.make_task, self.cb, self.threads, self.tell = p, make_task, cb, threads, tell
        self.runs = [_Run(c, root / str(c.index)) for c in p.candidates]
        self.steps = 0
        self.clock = clock
        self.t0 = clock()

    def seconds(self) -> float:
        return self.clock() - self.t0

    def out_of_time(self) -> bool:
        return self.seconds() >= self.plan.budget_seconds

    def so_far(self) -> dict[str, Any]:
        return {"steps_so_far": self.steps, "seconds_so_far": round(self.seconds(), 3),
                "budget_steps": self.plan.budget_steps, "budget_seconds": self.plan.budget_seconds}

    def run(self, hp: ResolvedHyperparameters, checkpoint_dir: Path | None) -> TrainResult:
        self.tell({"stage": "plan", "searched": list(hp.search), **self.plan.to_dict()})
        alive, timed_out = self.runs, False
        for i, epochs in enumerate(self.plan.rungs[:-1]):
            for r in alive:
                if self.out_of_time():  # no candidate starts once the time budget is spent
                    timed_out = True
                    break
                self._advance(r, epochs, i)
            timed_out = timed_out or self.out_of_time()  # spent inside this rung: no rung after it
            ranked = sorted(alive, key=lambda r: (r.score()[0], r.score()[1], -r.cand.index), reverse=True)
            keep = ranked[:1] if timed_out else ranked[: survivors(len(alive), i, len(self.plan.rungs))]
            self.tell({"stage": "rung", "rung": i, "epochs": epochs, "steps_so_far": self.steps,
                       "seconds_so_far": round(self.seconds(), 3),
                       "candidates": [r.report() for r in alive], "kept": [r.cand.name for r in keep],
                       **({"stopped_by": "time budget"} if timed_out else {})})
            alive = keep
            if timed_out:
                break
        winner = alive[0]
        search_seconds = self.seconds()
        if winner.failed is not None:  # every candidate diverged: a plain run would have too
            raise TrainingDiverged(f"{winner.failed} (every candidate of the hyper-parameter search diverged)")
        if winner.result is not None:  # it stopped early in a rung: nothing left to train
            result = winner.result
        else:
            before = winner.steps
            self.tell({"stage": "continuing", "chosen": winner.cand.name, "values": winner.cand.values,
                       "from_epoch": winner.epochs, "to_epoch": self.plan.rungs[-1], **self.so_far()})
            result = self._final(winner, checkpoint_dir)
            self.steps += result.metrics["steps"] - before
        seconds = self.seconds()
        record = {**self.plan.to_dict(), "chosen": winner.cand.name, "values": winner.cand.values,
                  "candidates": [r.report() for r in self.runs], "steps": self.steps, "seconds": round(seconds, 3),
                  "search_seconds": round(search_seconds, 3),
                  **({"stopped_by": "time budget"} if timed_out else {})}
        self.tell({"stage": "chosen", **record})
        result.metrics["search"] = record
        result.metrics["train_seconds"] = round(seconds, 3)
        result.seconds = seconds
        return result

    def _advance(self, r: _Run, until: int, rung: int) -> None:
        """Train ``r`` up to epoch ``until`` of its schedule (or its end), between a
        ``candidate_start`` and a ``candidate_end`` event; no caller callbacks but the cancel
        poll. Past the time budget it stops at its next step (its checkpoint keeps its place)."""
        if r.finished or r.epochs >= until:
            return
        before, t = r.steps, self.clock()
        self.tell({"stage": "candidate_start", "rung": rung, "name": r.cand.name, **r.cand.values,
                   "from_epoch": r.epochs, "to_epoch": until, **self.so_far()})
        cut: list[str] = []

        def should_yield(at_end: bool) -> bool:
            if at_end and r.epochs >= until:
                return True
            if self.out_of_time():
                cut.append("time budget")
                return True
            return False

        cb = TrainCallbacks(should_stop=self.cb.should_stop, should_yield=should_yield,
                            on_epoch=lambda epoch, m: r.history.append({"epoch": epoch, **m}))
        try:
            r.result = fit(self.make_task(r.cand.hp), r.cand.hp, callbacks=cb, checkpoint_dir=r.folder,
                           threads=self.threads)
            r.steps = r.result.metrics["steps"]
        except TrainingYielded as y:
            r.steps = y.step
        except TrainingDiverged as e:
            r.failed = str(e)
            r.steps = max(r.steps, r.history[-1]["step"] if r.history else 0)  # (steps of its last epoch uncounted)
        self.steps += r.steps - before
        self.tell({"stage": "candidate_end", "rung": rung, **r.report(), "steps": r.steps - before,
                   "seconds": round(self.clock() - t, 3), **({"cut": cut[0]} if cut else {}), **self.so_far()})

    def _final(self, winner: _Run, checkpoint_dir: Path | None) -> TrainResult:
        """Continue the winner to its end in ``checkpoint_dir`` (its own folder without one), with
        the caller's callbacks."""
        folder = winner.folder
        if checkpoint_dir is not None and (winner.folder / checkpoint.STATE).exists():
            checkpoint_dir.mkdir(parents=True, exist_ok=True)
            for name in (checkpoint.TENSORS, checkpoint.STATE):  # the JSON last, as checkpoint.save does
                shutil.copyfile(winner.folder / name, checkpoint_dir / f".{name}.search")
                (checkpoint_dir / f".{name}.search").replace(checkpoint_dir / name)
        if checkpoint_dir is not None:
            folder = checkpoint_dir
        return fit(self.make_task(winner.cand.hp), winner.cand.hp, callbacks=self.cb, checkpoint_dir=folder,
                   threads=self.threads)


def describe(record: dict[str, Any]) -> str:
    """One line for a search event (a job's event message)."""
    stage = record.get("stage")
    if stage == "plan":
        return (f"hyper-parameter search: {len(record['candidates'])} candidates "
                f"({', '.join(c['name'] for c in record['candidates'])}), rungs at epochs {record['rung_epochs']}, "
                f"budget {record['budget_steps']} steps and {record['budget_seconds']:g} s of search")
    if stage == "candidate_start":
        return (f"search rung {record['rung']}: training {record['name']} from epoch {record['from_epoch']} "
                f"to {record['to_epoch']} ({record['steps_so_far']}/{record['budget_steps']} steps so far)")
    if stage == "candidate_end":
        acc, loss = (_num(record.get(k)) for k in ("val_accuracy", "val_loss"))
        notes = "".join(f"; {k} {record[k]}" for k in ("stopped", "cut") if k in record)
        return (f"search rung {record['rung']}: {record['name']} at epoch {record['epochs']}: validation accuracy "
                f"{acc}, loss {loss} ({record['steps']} steps, {record['seconds']:.1f} s{notes})")
    if stage == "rung":
        return (f"search rung {record['rung']} (epoch {record['epochs']}): " + ", ".join(
            f"{c['name']} {c['val_accuracy'] if c['val_accuracy'] is not None else 'failed'}"
            for c in record["candidates"]) + f"; kept {', '.join(record['kept'])}"
            + ("; time budget spent" if record.get("stopped_by") else ""))
    if stage == "continuing":
        return (f"search: continuing {record['chosen']} from epoch {record['from_epoch']} to {record['to_epoch']} "
                f"after {record['steps_so_far']} steps, {record['seconds_so_far']:.1f} s of search")
    if stage == "chosen":
        return (f"search chose {record['chosen']} after {record['steps']} steps ({record['seconds']:.1f} s; budget "
                f"{record['budget_steps']} steps" + (", exploration cut by its time budget" if record.get("stopped_by")
                                                     else "") + ")")
    return f"search {stage}: continuing {record.get('chosen')}"


def _num(x: Any) -> str:
    return "none" if x is None else f"{x:.4f}"


def _resumed(p: SearchPlan, make_task: Callable[[ResolvedHyperparameters], TrainingTask],
             folder: Path) -> Candidate | None:
    """The candidate whose checkpoint ``folder`` holds (its search had ended), if any."""
    try:
        saved = json.loads((folder / checkpoint.STATE).read_text()).get("fingerprint")
    except (OSError, ValueError, AttributeError):
        return None
    return next((c for c in p.candidates if make_task(c.hp).fingerprint() == saved), None)
