"""The promotion gate's decisions, and reasons that say why without repeating the outcome.

The job's final message is "version N is now prod (REASON)" or "version N kept as a candidate
(REASON)" (adapters.jobs.runner); a reason that said the outcome again read "kept as a
candidate (...; kept as a candidate)".
"""

from __future__ import annotations

import pytest

from adapters.jobs.gate import GateDecision, decide

LABELS = ["pos"] * 6 + ["neg"] * 4  # always predicting "pos" scores 0.6
OUTCOME_WORDS = ("candidate", "kept", "now prod", "promoted")


def score(accuracy: float) -> dict[str, float]:
    return {"accuracy": accuracy, "macro_f1": accuracy, "n": len(LABELS)}


CASES = [  # mode, candidate accuracy, prod accuracy (None: no prod yet), promote?
    ("auto", 0.9, None, True),
    ("auto", 0.6, None, False),   # no better than the majority label
    ("auto", 0.5, 0.8, False),    # below the majority, prod present
    ("auto", 0.7, 0.8, False),    # beats the majority, worse than prod
    ("auto", 0.8, 0.8, True),     # as good as prod
    ("always", 0.1, 0.9, True),
    ("never", 1.0, None, False),
]


@pytest.mark.parametrize("mode,acc,prod,promote", CASES)
def test_decisions(mode: str, acc: float, prod: float | None, promote: bool) -> None:
    d = decide(mode, score(acc), None if prod is None else score(prod), None if prod is None else 3, LABELS)
    assert d.promote is promote
    assert d.majority_rate == pytest.approx(0.6)


@pytest.mark.parametrize("mode,acc,prod,promote", CASES)
def test_reasons_say_why_and_the_message_says_the_outcome_once(mode: str, acc: float, prod: float | None,
                                                                promote: bool) -> None:
    d: GateDecision = decide(mode, score(acc), None if prod is None else score(prod),
                             None if prod is None else 3, LABELS)
    assert not any(w in d.reason for w in OUTCOME_WORDS), d.reason
    outcome = "is now prod" if d.promote else "kept as a candidate"
    message = f"job succeeded: version 4 {outcome} ({d.reason})"  # as the runner composes it
    assert message.count("candidate") + message.count("now prod") == 1, message


def test_reasons_name_the_scores_compared() -> None:
    d = decide("auto", score(0.7), score(0.8), 3, LABELS)
    assert "0.700" in d.reason and "0.800" in d.reason and "v3" in d.reason
    assert "0.600" in decide("auto", score(0.55), None, None, LABELS).reason
