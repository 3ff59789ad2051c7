"""Fair sharing of training workers across tenants: the rule, in one place (plain data, no SQL).

The rule -- round robin over tenants, by how recently each last had a worker:

* A tenant's **clock** is the last time one of its jobs left a training worker (yielded,
  requeued after its worker died, or finished: ``jobs.released_at``). A tenant with a job on a
  worker right now counts as *now*; one that never had a worker counts as *never*.
* **Claim**: a free worker takes the oldest queued job (submit order) of the tenant whose clock
  is earliest -- *never* first; ties go to the tenant whose oldest queued job was submitted
  first, then to the lower tenant id -- skipping tenants at their ``max_concurrent_jobs``.
  Tenants therefore take turns; within one tenant, jobs run in submit order (a job that yielded
  keeps its place ahead of the tenant's newer jobs).
* **Yield**: a running job gives its worker back at its next checkpoint when some *other* tenant
  holds no worker and has a job that has waited at least ``FairShare.grace_seconds`` (longer
  than an idle worker's poll, so a job an idle worker is about to take causes no yield), once
  its turn (the time since it was claimed) has lasted ``min_turn_seconds``. Checkpoints are
  every epoch end and, once the turn has lasted ``slice_seconds``, any step boundary (a
  mid-epoch checkpoint), so a long epoch delays another tenant by about one slice at most. The
  minimum turn keeps jobs from trading the worker at every checkpoint: a small job finishes in
  one turn instead of handing the worker back to the long job it interrupted, and two long jobs
  switch at most once a turn, so the cost of a switch (reloading data, model copy, checkpoint:
  0.3-0.6 s for a 300-row MiniLM job in ``bench.fairness``) stays a small share. No job yields
  while its checkpoint cannot reach the store (another worker could not resume it). The job
  goes back to ``queued`` -- not failed, not a new job, and a yield is not counted as an attempt
  -- and later resumes from that checkpoint with its progress intact; it trains at least one
  step per turn, so work always advances.
* **Queue position**: the order in which free workers would take the queued jobs if nothing else
  changed: round robin over the tenants in clock order, each tenant's jobs in submit order.
  Position 1 is taken next.

Events a tenant reads never name another tenant (``describe_position``): isolation holds in
the queue too. The operator's worker log names both sides of a yield.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

_NEVER = datetime.min.replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class TenantClock:
    """One tenant with queued jobs, as the claim sees it."""

    tenant_id: int
    tenant: str
    on_worker: int  # its jobs validating or running right now
    last_released: datetime | None  # when one of its jobs last left a worker (None: never)
    first_queued: datetime  # submit time of its oldest queued job
    waiting_since: datetime  # earliest time one of its queued jobs entered the queue


@dataclass(frozen=True)
class QueuedJob:
    id: str
    tenant_id: int
    created_at: datetime


@dataclass(frozen=True)
class Contender:
    """Another tenant's job that should have a worker this job holds."""

    tenant: str  # for the operator's log only, never for the tenant's events
    waited_seconds: float


@dataclass(frozen=True)
class FairShare:
    """When a running job yields its worker (the claim order is always fair)."""

    yield_worker: bool = True  # False: jobs keep their worker until they end
    min_turn_seconds: float = 30.0  # no yield before a turn has lasted this long
    slice_seconds: float = 60.0  # a turn this long may also end mid-epoch, at a step boundary
    grace_seconds: float = 2.0  # a contender must have waited this long
    check_seconds: float = 1.0  # mid-epoch, ask the database at most this often


def clock_key(c: TenantClock) -> tuple[bool, bool, datetime, datetime, int]:
    """Sort key of the claim order: earliest clock first (see the module docstring)."""
    return (c.on_worker > 0, c.last_released is not None, c.last_released or _NEVER, c.first_queued,
            c.tenant_id)


def tenant_order(clocks: Iterable[TenantClock]) -> list[TenantClock]:
    return sorted(clocks, key=clock_key)


def queue_order(jobs: Sequence[QueuedJob], clocks: Mapping[int, TenantClock]) -> list[QueuedJob]:
    """Every queued job in the order free workers would take them (round robin over tenants)."""
    per_tenant: dict[int, list[QueuedJob]] = {}
    for job in sorted(jobs, key=lambda j: (j.created_at, j.id)):
        per_tenant.setdefault(job.tenant_id, []).append(job)
    tenants = [c.tenant_id for c in tenant_order(clocks[t] for t in per_tenant)]
    order: list[QueuedJob] = []
    for turn in range(max((len(js) for js in per_tenant.values()), default=0)):
        order.extend(per_tenant[t][turn] for t in tenants if turn < len(per_tenant[t]))
    return order


def contender(clocks: Iterable[TenantClock], tenant_id: int, now: datetime,
              grace_seconds: float) -> Contender | None:
    """The tenant a job of ``tenant_id`` should yield its worker to, or None."""
    for c in tenant_order(clocks):
        waited = (now - c.waiting_since).total_seconds()
        if c.tenant_id != tenant_id and c.on_worker == 0 and waited >= grace_seconds:
            return Contender(tenant=c.tenant, waited_seconds=waited)
    return None


def describe_position(position: int, ahead: Sequence[QueuedJob], tenant_id: int) -> str:
    """The tenant-facing line for a queued job: its position and whose jobs are ahead of it."""
    if position == 1:
        return "queued: position 1, next for a free training worker"
    own = [j.id for j in ahead if j.tenant_id == tenant_id]
    others = len(ahead) - len(own)
    parts = []
    if others:
        parts.append("another tenant's job" if others == 1 else f"{others} jobs of other tenants")
    if own:
        parts.append(f"your job {own[0]}" if len(own) == 1 else f"your jobs {', '.join(own)}")
    return f"queued: position {position}, waiting behind " + " and ".join(parts)


@dataclass
class YieldCheck:
    """The trainer's ``should_yield`` hook for one turn of one job (see the module docstring).

    ``find`` looks for a contender (a database read); once the turn is ``min_turn_seconds`` old
    it is asked at every epoch end and, once the turn is ``slice_seconds`` old, at most every
    ``check_seconds`` between steps.
    ``found`` keeps the answer that made the job yield. ``clock`` is injectable for tests.
    """

    policy: FairShare
    find: Callable[[], Contender | None]
    clock: Callable[[], float] = time.monotonic
    found: Contender | None = None
    started: float = field(default=math.nan)
    _checked: float = -math.inf

    def __post_init__(self) -> None:
        if math.isnan(self.started):
            self.started = self.clock()

    def __call__(self, at_epoch_end: bool) -> bool:
        if not self.policy.yield_worker:
            return False
        now = self.clock()
        if now - self.started < self.policy.min_turn_seconds:
            return False
        if not at_epoch_end:
            if now - self.started < self.policy.slice_seconds:
                return False
            if now - self._checked < self.policy.check_seconds:
                return self.found is not None  # the last answer, until it is time to ask again
        self._checked = now
        self.found = self.find()
        return self.found is not None
