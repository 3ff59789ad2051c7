"""A training worker does not outlive the serving process that started it.

``WorkerPool`` starts workers in their own session (so a terminal's Ctrl-C does not reach
them) and names itself in ``TAILOR_PARENT_PID``. If that serving process dies without
stopping its pool (SIGKILL, OOM kill), BentoML respawns it and the new one starts a pool of
its own: an orphaned worker would go on running beside the new pool and outlive
``bentoml serve``. ``watch_parent`` sets the worker's stop event once the named process is
gone (checked every ``interval`` seconds), so the worker stops as on SIGTERM: a running job
is left for recovery and resumes from its checkpoint. Without the variable (``tailor
worker`` on a training node) nothing is watched.
"""

from __future__ import annotations

import logging
import os
import threading

ENV = "TAILOR_PARENT_PID"
log = logging.getLogger("tailor.worker")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def watch_parent(stop: threading.Event, pid: int | None = None, interval: float = 1.0) -> threading.Thread | None:
    """Set ``stop`` when process ``pid`` (default: ``$TAILOR_PARENT_PID``) no longer exists."""
    if pid is None:
        raw = os.environ.get(ENV, "")
        if not raw.isdigit():
            return None
        pid = int(raw)

    def run() -> None:
        while not stop.wait(interval):
            if not alive(pid):
                log.warning("the serving process %d that started this worker is gone; stopping", pid)
                stop.set()
                return

    t = threading.Thread(target=run, name="tailor-parent-watch", daemon=True)
    t.start()
    return t
