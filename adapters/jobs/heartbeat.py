"""A job's pulse: renews the worker's lease and notices cancellation, off the training thread.

While a job runs, a background thread beats every ``interval`` seconds: it reads whether a
cancel was requested (``JobManager.cancel_requested``, a read that never queues behind
writers) and renews the lease (``JobManager.heartbeat``, a write). ``cancelled`` is set when
the tenant asked to cancel, ``lost`` when the job is no longer this worker's (its lease expired
and it was recovered elsewhere); the trainer polls ``should_stop`` every step, so either stops
training within about one interval. ``cancel_now`` asks the database at once: the runner calls
it before it publishes or records a failure, so a cancel the API accepted before then always
ends the job ``cancelled``, however late the thread's next beat would have seen it.
"""

from __future__ import annotations

import logging
import threading

from adapters.jobs.manager import JobManager, LostJobError

log = logging.getLogger(__name__)


class Heartbeat:
    def __init__(self, manager: JobManager, job_id: str, worker_id: str, interval: float = 1.0) -> None:
        self.manager, self.job_id, self.worker_id, self.interval = manager, job_id, worker_id, interval
        self.cancelled = threading.Event()
        self.lost = threading.Event()
        self.shutdown = threading.Event()  # the worker process is asked to stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def should_stop(self) -> bool:
        return self.cancelled.is_set() or self.lost.is_set() or self.shutdown.is_set()

    def cancel_now(self) -> bool:
        """Whether a cancel was requested, asked of the database now (sets ``cancelled``)."""
        if not self.cancelled.is_set() and self.manager.cancel_requested(self.job_id):
            self.cancelled.set()
        return self.cancelled.is_set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.cancel_now()
            except Exception:  # a database hiccup: the lease renewal below may still get through
                log.warning("cancel check for %s failed", self.job_id, exc_info=True)
            try:
                if self.manager.heartbeat(self.job_id, self.worker_id):
                    self.cancelled.set()
            except LostJobError:
                self.lost.set()
                return
            except Exception:  # a database hiccup: keep trying until the lease runs out
                log.warning("heartbeat for %s failed", self.job_id, exc_info=True)
