"""The one way Tailor writes to its metadata database: a transaction that is rerun when it lost a race.

``transaction(engine, fn)`` runs ``fn(conn)`` in one write transaction (``engine.begin()``:
``BEGIN IMMEDIATE`` on SQLite, see ``adapters.schema.engine``), commits when ``fn`` returns and
gives back what it returned. Every writer uses it: the registry, API keys, jobs and files.
Contract a caller may rely on:

* Which errors rerun. A transaction PostgreSQL aborted as a serialization failure (SQLSTATE
  ``40001``) or a deadlock victim (``40P01``) is rolled back and rerun from the start: nothing
  of it was kept, and the transaction it lost to has let go of its locks. With
  ``rerun_on_clash=True`` a unique-constraint clash (``IntegrityError``: a concurrent writer
  inserted the same row first, possible on PostgreSQL) is rerun too, so the rerun finds that row
  and moves on; without it the clash is raised at once (callers that turn it into "already
  exists" want that). Reruns follow at once, without waiting.
* How many times. At most ``WRITE_ATTEMPTS`` (5) runs that end in an abort, and as many that
  end in a clash; the error of the last one is raised.
* Nothing else reruns: not ``DatabaseUnavailableError`` (the database is out of reach, or a
  SQLite file stayed locked past its busy timeout: already waited for), nor any other SQL
  error, nor an error ``fn`` raises itself. Each failed run was rolled back: a write that
  raises has written nothing.
* ``fn`` must be safe to run again: everything it does goes through ``conn`` (rolled back
  with the transaction). It must not write files or the store, touch caches or shared state,
  or add to a list it did not create itself; do those after ``transaction`` returns (or undo
  them when it raises). Reading the clock or generating ids inside ``fn`` is fine.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import DBAPIError, IntegrityError

WRITE_ATTEMPTS = 5
# PostgreSQL aborts one of two transactions with these; rerunning it is always safe.
RERUN_SQLSTATES = ("40001", "40P01")  # serialization_failure, deadlock_detected

T = TypeVar("T")


def transaction(engine: Engine, fn: Callable[[Connection], T], *, rerun_on_clash: bool = False) -> T:
    """Run ``fn`` in one write transaction on ``engine``, rerun as the module docstring says."""
    clashes = WRITE_ATTEMPTS if rerun_on_clash else 1
    aborts = 0
    while True:
        try:
            with engine.begin() as conn:
                return fn(conn)
        except IntegrityError:
            clashes -= 1
            if clashes <= 0:
                raise
        except DBAPIError as e:
            aborts += 1
            if not is_rerunnable(e) or aborts >= WRITE_ATTEMPTS:
                raise


def is_rerunnable(error: DBAPIError) -> bool:
    """Whether the database aborted the transaction only to let another go first."""
    return getattr(error.orig, "sqlstate", None) in RERUN_SQLSTATES
