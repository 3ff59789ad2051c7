"""The change log: every registry mutation appends one row, which other processes poll.

* ``log_change(conn, tenant, adapter, kind)`` appends, inside the caller's write transaction,
  so a change is logged exactly when its rows commit. Writers outside the registry use it too
  (``adapters.keys`` logs ``key_revoked``).
* Sequence numbers grow and become visible in order on both backends: once ``change_seq()``
  returns n, every change up to n can be read, so a poller that reads ``changes_since`` its last
  seq never skips one that committed late (``adapters.schema.engine.lock_change_log``).
* The log names tenants and adapters as text, not foreign keys: an entry outlives what it talks
  about (``tenant_deleted`` is the last word on a tenant).
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, func, insert, select

from adapters.registry.records import Change, change_record
from adapters.schema import changes, lock_change_log, utcnow

MAX_CHANGES_PAGE = 10_000


def log_change(conn: Connection, tenant: str, adapter: str | None, kind: str) -> None:
    lock_change_log(conn)  # seqs must commit in order (PostgreSQL), see lock_change_log
    conn.execute(insert(changes).values(tenant=tenant, adapter=adapter, kind=kind, at=utcnow()))


class ChangeLog:
    """The registry's read side of the log (a part of ``Registry``)."""

    _reader: Engine

    def change_seq(self) -> int:
        with self._reader.connect() as conn:
            return int(conn.scalar(select(func.coalesce(func.max(changes.c.seq), 0))) or 0)

    def changes_since(self, seq: int, limit: int = 1000) -> list[Change]:
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be a non-negative int, got {seq!r}")
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_CHANGES_PAGE:
            raise ValueError(f"limit must be an int in 1..{MAX_CHANGES_PAGE}, got {limit!r}")
        with self._reader.connect() as conn:
            rows = conn.execute(
                select(changes).where(changes.c.seq > seq).order_by(changes.c.seq).limit(limit)
            ).all()
        return [change_record(r) for r in rows]
