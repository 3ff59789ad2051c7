"""One task per adapter: every version of a tenant's adapter is of one task kind.

A tenant cannot mix tasks in one adapter's versions (a text version and an image version of
"sentiment" could not be compared by the gate, rolled back to, or served by one engine). The
task of an adapter is what its versions' manifests say (``adapters.tasks.task_of_manifest``:
the legacy ``"classification"`` is text), and while it has none yet, the task of an active job
that will publish its first version. Read inside the caller's transaction:

* ``adapter_task(conn, tenant_id, adapter)`` -> ``(task, why)`` or None for a free name; ``why``
  says where the task was read ("its versions are ...", "an active job ... trains ...").
* ``held_task(db, tenant, adapter)``: ``adapter_task`` on its own connection, by tenant name
  (None for an unknown tenant too).
* ``enforce_adapter_task(conn, tenant_id, adapter, task)`` raises ``AdapterTaskError``
  (a ``ConflictError``: HTTP 409) naming the adapter's task when ``task`` is another one.
"""

from __future__ import annotations

from sqlalchemy import Connection, Engine, select

from adapters import schema
from adapters.errors import AdapterTaskError  # noqa: F401 (raised here; importable from here as before)
from adapters.jobs.model import ACTIVE
from adapters.tasks import task_of_manifest

A, V, J = schema.adapters, schema.adapter_versions, schema.jobs


def adapter_task(conn: Connection, tenant_id: int, adapter: str, *,
                 exclude_job: str | None = None) -> tuple[str, str] | None:
    manifest = conn.scalar(
        select(V.c.manifest).select_from(V.join(A, A.c.id == V.c.adapter_id))
        .where(A.c.tenant_id == tenant_id, A.c.name == adapter).order_by(V.c.version.desc()).limit(1)
    )
    if manifest is not None:
        task = task_of_manifest(manifest)
        return task, f"its versions are {task}"
    query = select(J.c.id, J.c.task).where(J.c.tenant_id == tenant_id, J.c.adapter == adapter,
                                           J.c.status.in_(ACTIVE))
    if exclude_job is not None:
        query = query.where(J.c.id != exclude_job)
    job = conn.execute(query.order_by(J.c.created_at, J.c.id).limit(1)).first()
    if job is not None:
        return job.task, f"its active job {job.id} trains {job.task}"
    return None


def held_task(db: Engine, tenant: str, adapter: str, *, exclude_job: str | None = None) -> tuple[str, str] | None:
    with db.connect() as conn:
        tid = conn.scalar(select(schema.tenants.c.id).where(schema.tenants.c.name == tenant))
        return None if tid is None else adapter_task(conn, tid, adapter, exclude_job=exclude_job)


def enforce_adapter_task(conn: Connection, tenant_id: int, adapter: str, task: str, *,
                         exclude_job: str | None = None) -> None:
    found = adapter_task(conn, tenant_id, adapter, exclude_job=exclude_job)
    if found is not None and found[0] != task:
        raise AdapterTaskError(
            f"adapter {adapter!r} is of task {found[0]} ({found[1]}); this job trains {task}. "
            "An adapter's versions all have one task: train under another adapter name.", param="adapter")
