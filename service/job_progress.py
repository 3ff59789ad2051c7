"""What the CLI shows while a training job runs (``tailor train --wait``, ``tailor jobs follow``).

``JobProgress(stream, bar=True)`` draws one progress bar over the job's training steps with the
live train loss and the last epoch's validation accuracy in its postfix; the other events
(each epoch's summary, warnings, errors, the outcome) are printed above the bar as they
arrive. With ``bar=False`` (a pipe, a log file, ``--no-progress``) every event is one line
instead, step losses included, so a log keeps the whole learning curve; an epoch's metrics
event is not printed there, since the trainer's own line for that epoch says the same (it was
printed twice). Events are the dicts of ``GET /v1/jobs/{id}/events``; the display only reads
them and never fails on a shape it does not know.

A job that stops before its planned steps (early stopping) reports a last step with the plan
shrunk to the steps it ran, so the bar ends full; ``finish(status)`` also fills a bar a
succeeded job left short (a server that does not report it).
"""

from __future__ import annotations

from typing import Any, TextIO


_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}{postfix}]"


def event_line(event: dict[str, Any]) -> str:
    return f"{event.get('at', '')}  {event.get('level', ''):<7} {event.get('message', '')}"


class JobProgress:
    def __init__(self, stream: TextIO, *, bar: bool) -> None:
        self.stream = stream
        self._tqdm: Any = None
        self._bar: Any = None
        if bar:
            try:
                from tqdm import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency; the lines still work
                tqdm = None
            self._tqdm = tqdm
        self._postfix: dict[str, str] = {}

    def __enter__(self) -> JobProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def show(self, event: dict[str, Any]) -> None:
        data = event.get("data") if isinstance(event.get("data"), dict) else {}
        if self._tqdm is None:
            if not (event.get("type") == "metrics" and "val_accuracy" in data):
                print(event_line(event), file=self.stream, flush=True)
            return
        if event.get("type") == "metrics":  # the bar shows these; the trainer says each epoch in words too
            if isinstance(data.get("val_accuracy"), (int, float)):
                self._postfix["val_acc"] = f"{data['val_accuracy']:.3f}"
                self._refresh()
            elif isinstance(data.get("step"), int):
                self._step(data)
            return
        self._tqdm.write(event_line(event), file=self.stream)

    def finish(self, status: str) -> None:
        """The job ended with ``status``: a succeeded job's bar ends full (at the steps it ran)."""
        bar = self._bar
        if bar is not None and status == "succeeded" and bar.total and bar.n < bar.total:
            bar.total = bar.n
            self._refresh()

    def _step(self, data: dict[str, Any]) -> None:
        total = data.get("total_steps")
        if self._bar is None:
            # no rate or ETA: events arrive in bursts, one poll apart, so a client-side rate is noise
            self._bar = self._tqdm(total=total if isinstance(total, int) else None, unit="step", desc="training",
                                   file=self.stream, dynamic_ncols=True, leave=True, bar_format=_BAR)
        elif isinstance(total, int) and self._bar.total != total:  # a resumed job may plan anew
            self._bar.total = total
        self._bar.n = data["step"]
        if isinstance(data.get("epoch"), int):
            self._postfix["epoch"] = str(data["epoch"])
        if isinstance(data.get("train_loss"), (int, float)):
            self._postfix["loss"] = f"{data['train_loss']:.4f}"
        self._refresh()

    def _refresh(self) -> None:
        if self._bar is not None:
            shown = {k: self._postfix[k] for k in ("epoch", "loss", "val_acc") if k in self._postfix}
            self._bar.set_postfix(shown, refresh=False)
            self._bar.refresh()
