"""Training checkpoints shared through the adapter store, so a job resumes on any worker.

A worker trains with a local checkpoint folder (``adapters.training.checkpoint``). After each
epoch's local save, ``share`` copies the folder's two files to
``tenants/<tenant>/checkpoints/<job id>/`` in the store: tensors first, ``state.json`` last,
so a reader that finds the JSON also finds tensors of that epoch or a later one (a mismatched
pair is refused by ``checkpoint.load``, which then trains from scratch: never wrong weights).
Before training, ``fetch`` fills an empty local folder from the store, so a job requeued onto
another node after its worker died resumes where that worker's last epoch ended.

Copies are best effort: a store outage costs resumability, never the job (``share`` and
``fetch`` log and return False). ``discard`` removes the shared copy when the job ends;
deleting the tenant removes it too, as it lives under the tenant's prefix.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from adapters.errors import NotFoundError, TailorError
from adapters.store import AdapterStore
from adapters.training.checkpoint import STATE, TENSORS

log = logging.getLogger(__name__)
FILES = (TENSORS, STATE)  # upload order: the JSON that names the epoch goes last
MAX_CHECKPOINT_BYTES = 8 << 30


def prefix(tenant: str, job_id: str) -> str:
    return f"tenants/{tenant}/checkpoints/{job_id}/"


def share(store: AdapterStore, tenant: str, job_id: str, folder: Path) -> bool:
    """Copy the local checkpoint to the store; False (logged) when it could not be."""
    try:
        for name in FILES:
            store.put(prefix(tenant, job_id) + name, (folder / name).read_bytes())
    except (OSError, TailorError) as e:
        log.warning("job %s: checkpoint not shared through the store (%s); only this worker can "
                    "resume it", job_id, e)
        return False
    return True


def fetch(store: AdapterStore, tenant: str, job_id: str, folder: Path) -> bool:
    """Fill ``folder`` from the shared checkpoint unless it has one; True when one was fetched."""
    if (folder / STATE).exists():
        return False
    try:
        # JSON first: if a newer epoch is being shared meanwhile, the tensors read next are at
        # least as new, and a mismatched pair is refused when loaded.
        blobs = {name: store.get(prefix(tenant, job_id) + name, max_bytes=MAX_CHECKPOINT_BYTES)
                 for name in reversed(FILES)}
    except NotFoundError:
        return False
    except TailorError as e:
        log.warning("job %s: shared checkpoint unavailable (%s); training from scratch", job_id, e)
        return False
    folder.mkdir(parents=True, exist_ok=True)
    for name in FILES:  # the JSON last, as checkpoint.save does
        tmp = folder / f".{name}.fetched"
        tmp.write_bytes(blobs[name])
        os.replace(tmp, folder / name)
    return True


def discard(store: AdapterStore, tenant: str, job_id: str) -> None:
    try:
        store.delete_prefix(prefix(tenant, job_id))
    except TailorError as e:  # an orphan checkpoint costs space only
        log.warning("job %s: shared checkpoint not removed (%s)", job_id, e)
