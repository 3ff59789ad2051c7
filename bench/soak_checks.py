"""What the soak records, and how each answer is judged (pure functions, no I/O).

Every tenant's adapter versions carry label names that say whose they are and which version
(``t007-v2-a``, ``t007-v2-b``; a trained adapter's ``t007-job-pos``), so each prediction says
which adapter answered. An answer is right when its labels are exactly that tenant's labels
for the version the response names, and that version is the pinned one (``clf@2``) or was the
tenant's ``prod`` at some moment while the request was in flight.

Promotions and rollbacks are timed on the client: the switch happened at an unknown moment
between sending the change and its response. Every serving worker sees a change through the
registry's change log within a second (the service's promise), so an answer of the previous
``prod`` within ``STALE_S`` of the change's response is counted as ``stale`` (allowed, and
reported); anything later is wrong.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

STALE_S = 1.0  # every serving worker sees a change within this long (the service's promise)
ADAPTER = "clf"  # each tenant's served adapter (imported versions)
JOB_ADAPTER = "job"  # what training jobs publish to
_VERSION_LABEL = re.compile(r"(?P<tenant>[a-z0-9_-]+?)-v(?P<version>\d+)-[a-z]")


def version_labels(tenant: str, version: int, n: int) -> list[str]:
    """The label names of ``tenant``'s imported version ``version`` (``n`` of them)."""
    return [f"{tenant}-v{version}-{chr(ord('a') + i)}" for i in range(n)]


def job_labels(tenant: str) -> list[str]:
    return [f"{tenant}-job-neg", f"{tenant}-job-pos"]


@dataclass(frozen=True)
class Change:
    """One promote or rollback of a tenant's ``prod``, timed on the client."""

    tenant: str
    kind: str  # "promote" | "rollback"
    sent: float
    received: float
    old: int
    new: int


@dataclass(frozen=True)
class Answer:
    """One well-formed predict and what came back (``status`` 0: no response at all)."""

    source: str  # "load" | "probe" | "job"
    tenant: str
    ref: str  # "clf", "clf@3", "job@2"
    sent: float
    received: float
    status: int
    worker: str
    body: bytes

    @property
    def pinned(self) -> int | None:
        _, _, v = self.ref.partition("@")
        return int(v) if v.isdigit() else None


@dataclass
class Verdict:
    ok: bool
    stale: bool = False
    version: int | None = None
    reason: str = ""


@dataclass
class Timeline:
    """Each tenant's ``prod`` history: the first version, then the changes in order."""

    initial: dict[str, int]
    changes: dict[str, list[Change]] = field(default_factory=dict)

    def add(self, change: Change) -> None:
        self.changes.setdefault(change.tenant, []).append(change)

    def prod_between(self, tenant: str, a: float, b: float) -> set[int]:
        """Versions that may have been ``prod`` at some moment in ``[a, b]``.

        Change k switched at an unknown moment x_k in [sent_k, received_k]; changes of one
        tenant never overlap (one churn task makes them in turn). Version k (the one change k
        set; k = 0: the initial one) was prod on [x_k, x_{k+1}), which can meet [a, b] iff
        sent_k <= b and received_{k+1} > a.
        """
        cs = self.changes.get(tenant, [])
        starts = [float("-inf")] + [c.sent for c in cs]
        ends = [c.received for c in cs] + [float("inf")]
        versions = [self.initial[tenant]] + [c.new for c in cs]
        return {v for v, s, e in zip(versions, starts, ends, strict=True) if s <= b and e > a}


def judge(answer: Answer, timeline: Timeline, n_labels: dict[tuple[str, int], int]) -> Verdict:
    """Is this 200 answer from the right tenant, the right version and that version's head?"""
    try:
        body: dict[str, Any] = json.loads(answer.body)
        version = int(body["version"])
        preds = body["predictions"]
    except (ValueError, KeyError, TypeError) as e:
        return Verdict(False, reason=f"unreadable answer: {e}")
    name, _, _ = answer.ref.partition("@")
    if body.get("adapter") != name:
        return Verdict(False, version=version, reason=f"answer names adapter {body.get('adapter')!r}")
    if name == JOB_ADAPTER:
        want = set(job_labels(answer.tenant))
    else:
        n = n_labels.get((answer.tenant, version))
        if n is None:
            return Verdict(False, version=version, reason=f"{answer.tenant} has no version {version}")
        want = set(version_labels(answer.tenant, version, n))
    for p in preds:
        if p.get("label") not in want or set(p.get("scores", {})) != want:
            got = p.get("label")
            m = _VERSION_LABEL.fullmatch(str(got))
            whose = f" ({m['tenant']} v{m['version']})" if m else ""
            return Verdict(False, version=version, reason=f"label {got!r}{whose} is not {answer.tenant} v{version}'s")
    pinned = answer.pinned
    if pinned is not None:
        if version != pinned:
            return Verdict(False, version=version, reason=f"asked for version {pinned}, got {version}")
        return Verdict(True, version=version)
    if version in timeline.prod_between(answer.tenant, answer.sent, answer.received):
        return Verdict(True, version=version)
    if version in timeline.prod_between(answer.tenant, answer.sent - STALE_S, answer.received):
        return Verdict(True, stale=True, version=version)
    return Verdict(False, version=version,
                   reason=f"version {version} was not prod while the request ran "
                          f"(prod: {sorted(timeline.prod_between(answer.tenant, answer.sent, answer.received))})")


def in_window(sent: float, received: float, window: tuple[float, float] | None) -> bool:
    """Did a request that ran over [sent, received] overlap the fault window?"""
    return window is not None and sent <= window[1] and received >= window[0]
