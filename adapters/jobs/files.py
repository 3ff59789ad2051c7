"""Uploaded datasets: checked completely at upload, stored normalised, owned by one tenant.

``Files.upload`` parses and validates the bytes with the parser of the file's task
(``adapters.tasks``; default text classification, ``adapters.datasets``) before anything is
written; only a valid dataset is stored, in the task's stored form (``adapters.jobs.task_data``:
normalised JSON Lines) under a fresh store key, and then recorded in the ``files`` table with
its task. ``Files.load`` reads it back by that task, checksummed, without parsing the upload
again. An upload whose bytes would take the tenant past its
storage quota (``max_storage_bytes``: uploaded files plus adapter versions) is refused
(``StorageQuotaError``, 409) before it is parsed, and again, atomically, when it is recorded. A file id is only ever visible to its tenant:
another tenant's id is "not found". Deleting a file leaves jobs that already copied it alone.
Each row write is one ``adapters.schema.transaction`` (rerun on a deadlock or serialization
failure); the bytes are stored before it and deleted again if it fails.
"""

from __future__ import annotations

import secrets
from typing import Any

from sqlalchemy import Connection, Engine, delete, insert, select

from adapters import schema
from adapters.errors import InvalidNameError, NotFoundError
from adapters.jobs import task_data
from adapters.jobs.model import FileRecord
from adapters.jobs.task_data import dataset_from_jsonl, dataset_to_jsonl
from adapters.names import validate_name
from adapters.quotas import TenantQuotas, enforce_storage, lock_tenant
from adapters.registry.core import tenant_id
from adapters.schema import read_only, transaction, utcnow
from adapters.store import AdapterStore
from adapters.tasks import TEXT_CLASSIFICATION, get_task

__all__ = ["Files", "dataset_from_jsonl", "dataset_to_jsonl", "new_id"]
MAX_FILENAME = 255


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


class Files:
    def __init__(self, db: Engine, store: AdapterStore) -> None:
        self.db, self.store = db, store
        self._read = read_only(db)

    def upload(self, tenant: str, filename: str, data: bytes, *, limits: Any,
               format: str | None = None, task: str = TEXT_CLASSIFICATION) -> FileRecord:
        """Validate ``data`` as a dataset of ``task`` and store it. ``limits``: the tenant's
        ``DatasetLimits`` (``TenantQuotas.dataset_limits``), or the task's own limits type
        (``adapters.jobs.task_data.limits_for``)."""
        validate_name(tenant, "tenant")
        task = task_data.task_name(task)
        limits = task_data.limits_for(task, limits)
        filename = _clean_filename(filename)
        format, shown_format = task_data.upload_format(task, filename, format, data)
        with self._read.connect() as conn:  # early answer before parsing; decided again below
            tid = tenant_id(conn, tenant)
            quotas = TenantQuotas.stored(conn.scalar(select(schema.tenants.c.quotas).where(schema.tenants.c.id == tid)))
            enforce_storage(conn, tid, quotas, len(data), what=f"file {filename!r}", param="file")
        ds = get_task(task).parse_dataset(data, format=format, limits=limits, what=filename)
        file_id = new_id("file")
        key = f"tenants/{tenant}/files/{file_id}.jsonl"
        body = task_data.dump(task, ds)
        sha = self.store.put(key, body)
        row = {
            "id": file_id, "filename": filename, "format": shown_format, "task": task, "rows": len(ds),
            "labels": list(ds.labels), "duplicates_dropped": ds.duplicates_dropped,
            "bytes": len(data), "store_key": key, "sha256": sha,
        }
        try:
            return transaction(self.db, lambda conn: _insert(conn, tenant, row))
        except BaseException:
            self.store.delete(key)
            raise

    def get(self, tenant: str, file_id: str) -> FileRecord:
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            row = conn.execute(
                select(schema.files).join(schema.tenants, schema.files.c.tenant_id == schema.tenants.c.id)
                .where(schema.tenants.c.name == tenant, schema.files.c.id == _file_id(file_id))
            ).mappings().first()
        if row is None:
            raise NotFoundError(f"file {file_id!r} not found", param="file")
        return _record(tenant, dict(row))

    def list(self, tenant: str) -> list[FileRecord]:
        validate_name(tenant, "tenant")
        with self._read.connect() as conn:
            rows = conn.execute(
                select(schema.files).join(schema.tenants, schema.files.c.tenant_id == schema.tenants.c.id)
                .where(schema.tenants.c.name == tenant).order_by(schema.files.c.created_at.desc())
            ).mappings().all()
        return [_record(tenant, dict(r)) for r in rows]

    def delete(self, tenant: str, file_id: str) -> None:
        rec = self.get(tenant, file_id)
        transaction(self.db, lambda conn: conn.execute(delete(schema.files).where(schema.files.c.id == rec.id)))
        self.store.delete(rec.store_key)

    def load(self, tenant: str, file_id: str) -> tuple[FileRecord, Any]:
        """The file's record and its dataset (a ``Dataset``, an ``ImageDataset``: ``rec.task``'s)."""
        rec = self.get(tenant, file_id)
        return rec, task_data.load(rec.task, self.store.get(rec.store_key, sha256=rec.sha256))


def _insert(conn: Connection, tenant: str, row: dict[str, Any]) -> FileRecord:
    # The tenant row stays locked to the insert: concurrent uploads count in turn.
    tid, quotas = lock_tenant(conn, tenant)
    enforce_storage(conn, tid, quotas, row["bytes"], what=f"file {row['filename']!r}", param="file")
    created_at = utcnow()
    conn.execute(insert(schema.files).values(tenant_id=tid, created_at=created_at, **row))
    return _record(tenant, {**row, "created_at": created_at})


def _file_id(value: str) -> str:
    if not isinstance(value, str) or not value.startswith("file-") or not value[5:].isalnum() or len(value) > 40:
        raise NotFoundError(f"file {str(value)[:60]!r} not found", param="file")
    return value


def _clean_filename(name: object) -> str:
    if not isinstance(name, str) or not name.strip():
        return "upload"
    # Only a label for people: keep the last path segment, printable, bounded.
    base = name.replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(ch for ch in base if ch.isprintable())[:MAX_FILENAME]
    if not base:
        raise InvalidNameError("file name has no printable characters", param="filename")
    return base


def _record(tenant: str, row: dict[str, Any]) -> FileRecord:
    return FileRecord(
        id=row["id"], tenant=tenant, filename=row["filename"], format=row["format"], rows=row["rows"],
        labels=list(row["labels"]), duplicates_dropped=row["duplicates_dropped"], bytes=row["bytes"],
        created_at=row["created_at"], task=row["task"], store_key=row["store_key"], sha256=row["sha256"],
    )

