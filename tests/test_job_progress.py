"""The CLI's job display on its own: the bar follows steps, loss and validation accuracy; lines
mode prints every event; shapes it does not know are shown as lines, never a crash."""

from __future__ import annotations

import io

from service.job_progress import JobProgress

EVENTS = [
    {"id": 1, "at": "t1", "level": "info", "type": "message", "message": "job created"},
    {"id": 2, "at": "t2", "level": "info", "type": "metrics", "message": "step 10/40: train loss 0.6900",
     "data": {"step": 10, "total_steps": 40, "epoch": 1, "train_loss": 0.69}},
    {"id": 3, "at": "t3", "level": "info", "type": "metrics", "message": "epoch 1: val_accuracy 0.7500",
     "data": {"epoch": 1, "step": 20, "train_loss": 0.6, "val_accuracy": 0.75}},
    {"id": 4, "at": "t4", "level": "info", "type": "message", "message": "epoch 1/2: train loss 0.6000"},
    {"id": 5, "at": "t5", "level": "info", "type": "metrics", "message": "step 40/40: train loss 0.1234",
     "data": {"step": 40, "total_steps": 40, "epoch": 2, "train_loss": 0.1234}},
    {"id": 6, "at": "t6", "level": "warning", "type": "message", "message": "checkpoint not shared"},
]
ODD = [{}, {"type": "metrics"}, {"type": "metrics", "data": None}, {"type": "metrics", "data": {"step": "x"}},
       {"type": "metrics", "data": {"step": 3, "total_steps": None, "train_loss": "nan?"}}, {"data": [1, 2]}]


def test_bar_shows_steps_loss_and_validation_accuracy():
    out = io.StringIO()
    with JobProgress(out, bar=True) as view:
        for event in EVENTS:
            view.show(event)
    text = out.getvalue()
    assert "40/40 steps" in text and "loss=0.1234" in text and "val_acc=0.750" in text and "epoch=2" in text
    assert "job created" in text and "checkpoint not shared" in text and "epoch 1/2: train loss" in text
    assert "step 10/40: train loss" not in text  # metrics events live in the bar, not as lines


def test_lines_mode_prints_every_event_in_order_and_each_epoch_once():
    out = io.StringIO()
    with JobProgress(out, bar=False) as view:
        for event in EVENTS:
            view.show(event)
    lines = out.getvalue().splitlines()
    # the epoch's metrics event (t3) is what the trainer's own epoch line (t4) says: printed once
    assert [line.split()[0] for line in lines] == [e["at"] for e in EVENTS if e["id"] != 3]
    assert sum("epoch 1" in line for line in lines) == 1
    assert "step 10/40: train loss" in out.getvalue()  # step losses stay: the log keeps the curve
    assert "\r" not in out.getvalue() and "warning" in lines[-1]


EARLY_STOP = [  # planned 90 steps; early stopping after 60 reports the plan shrunk to 60
    {"id": 1, "type": "metrics", "message": "step 60/90: train loss 0.3000",
     "data": {"step": 60, "total_steps": 90, "epoch": 2, "train_loss": 0.3}},
    {"id": 2, "type": "message", "message": "early stop: no better validation accuracy for 1 epochs"},
    {"id": 3, "type": "metrics", "message": "step 60/60: train loss 0.3100",
     "data": {"step": 60, "total_steps": 60, "epoch": 2, "train_loss": 0.31}},
]


def bar_states(text: str) -> list[str]:
    return [part.split("[")[0].strip() for part in text.replace("\n", "\r").split("\r") if "steps" in part]


def test_a_job_stopped_early_ends_its_bar_full():
    out = io.StringIO()
    with JobProgress(out, bar=True) as view:
        for event in EARLY_STOP:
            view.show(event)
        view.finish("succeeded")
    last = bar_states(out.getvalue())[-1]
    assert "100%" in last and "60/60 steps" in last, last


def test_finish_fills_a_succeeded_jobs_bar_and_leaves_a_failed_one():
    for status, expected in (("succeeded", "100%"), ("failed", "67%")):
        out = io.StringIO()
        with JobProgress(out, bar=True) as view:
            view.show(EARLY_STOP[0])  # a server that never reports the shrunk plan
            view.finish(status)
        last = bar_states(out.getvalue())[-1]
        assert expected in last, (status, last)


def test_unknown_shapes_never_break_the_display():
    for bar in (True, False):
        out = io.StringIO()
        with JobProgress(out, bar=bar) as view:
            for event in ODD + EVENTS:
                view.show(event)
        assert "checkpoint not shared" in out.getvalue()
