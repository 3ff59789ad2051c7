"""Rows waiting for a forward pass: one FIFO per tenant, served round robin.

The micro-batcher merges rows of many tenants into one batch; *which* rows go next decides
whether one tenant's flood can starve another. ``FairQueue`` keeps each tenant's requests in
arrival order and forms a batch by deficit round robin over the tenants that have rows
waiting: each round gives every waiting tenant an equal share of the room left (at least one
row), starting with the tenant served least recently. Contract:

* A tenant that starts waiting joins the back of the rotation, so its first row is in one of
  the next batches however many rows other tenants have queued: with ``k`` tenants waiting
  and batches of ``m`` rows it waits for at most ``ceil(k / m)`` batches (one, while fewer
  tenants than rows per batch are waiting).
* Within one tenant requests keep their order; a request larger than its share is split and
  its remaining rows stay first in its tenant's line.
* ``max_rows_per_tenant`` bounds what one tenant may have waiting: ``push`` refuses more
  with ``TenantBusyError`` before anything is queued (cheap, no work was done). A tenant with
  nothing waiting may always queue one request, whatever its size.
* Entries whose ``abandoned()`` is true (their caller went away, or an earlier part failed)
  are dropped when reached, without taking room.
* Not thread-safe: the batcher calls it under its own lock.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

from adapters.errors import TenantBusyError


class Waiting(Protocol):
    arrived: float  # monotonic seconds when it was queued

    @property
    def size(self) -> int: ...

    def abandoned(self) -> bool: ...


W = TypeVar("W", bound=Waiting)


class FairQueue(Generic[W]):
    def __init__(self, max_rows_per_tenant: int | None = None) -> None:
        if max_rows_per_tenant is not None and max_rows_per_tenant < 1:
            raise ValueError("max_rows_per_tenant must be at least 1")
        self.max_rows_per_tenant = max_rows_per_tenant
        self._lines: dict[str, deque[list]] = {}  # tenant -> [[item, next row], ...], oldest first
        self._rotation: deque[str] = deque()  # tenants with rows waiting; served from the left
        self._waiting: dict[str, int] = {}  # tenant -> rows waiting
        self.rows = 0

    def __len__(self) -> int:
        return self.rows

    def waiting(self, tenant: str) -> int:
        return self._waiting.get(tenant, 0)

    @property
    def tenants(self) -> int:
        return len(self._rotation)

    def push(self, tenant: str, item: W) -> None:
        n = item.size
        have = self._waiting.get(tenant, 0)
        limit = self.max_rows_per_tenant
        if limit is not None and have and have + n > limit:
            raise TenantBusyError(
                f"tenant {tenant!r} already has {have} rows waiting to be served (at most {limit}); "
                "retry when earlier requests have been answered")
        line = self._lines.get(tenant)
        if line is None:
            line = self._lines[tenant] = deque()
            self._rotation.append(tenant)
        line.append([item, 0])
        self._waiting[tenant] = have + n
        self.rows += n

    def oldest_arrival(self) -> float | None:
        """When the longest-waiting row still queued arrived (None when empty)."""
        heads = [line[0][0].arrived for line in self._lines.values() if line]
        return min(heads) if heads else None

    def take(self, room: int) -> list[tuple[W, int, int]]:
        """Up to ``room`` rows as ``(item, start, stop)`` slices, fairly across tenants."""
        taken: list[tuple[W, int, int]] = []
        while room > 0 and self._rotation:
            share = max(1, room // len(self._rotation))
            for _ in range(len(self._rotation)):  # one round: each tenant waiting at its start
                if room == 0:
                    break
                tenant = self._rotation.popleft()
                line = self._lines[tenant]
                got = 0
                while line and got < share and room > 0:
                    entry = line[0]
                    item, start = entry
                    left = item.size - start
                    if item.abandoned():
                        line.popleft()
                        self._drop(tenant, left)
                        continue
                    n = min(share - got, room, left)
                    taken.append((item, start, start + n))
                    got += n
                    room -= n
                    self._drop(tenant, n)
                    if n == left:
                        line.popleft()
                    else:
                        entry[1] = start + n
                if line:
                    self._rotation.append(tenant)
                else:
                    del self._lines[tenant]
        return taken

    def drain(self) -> list[W]:
        """Remove and return every queued item (each once)."""
        items = [entry[0] for line in self._lines.values() for entry in line]
        self._lines.clear()
        self._rotation.clear()
        self._waiting.clear()
        self.rows = 0
        return items

    def _drop(self, tenant: str, n: int) -> None:
        self.rows -= n
        left = self._waiting[tenant] - n
        if left:
            self._waiting[tenant] = left
        else:
            del self._waiting[tenant]
