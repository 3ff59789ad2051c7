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


def test_lines_mode_prints_every_event_in_order():
    out = io.StringIO()
    with JobProgress(out, bar=False) as view:
        for event in EVENTS:
            view.show(event)
    lines = out.getvalue().splitlines()
    assert [line.split()[0] for line in lines] == [e["at"] for e in EVENTS]
    assert "\r" not in out.getvalue() and "warning" in lines[-1]


def test_unknown_shapes_never_break_the_display():
    for bar in (True, False):
        out = io.StringIO()
        with JobProgress(out, bar=bar) as view:
            for event in ODD + EVENTS:
                view.show(event)
        assert "checkpoint not shared" in out.getvalue()
