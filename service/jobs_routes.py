"""Routes for uploaded datasets and fine-tuning jobs (tenant key), over ``adapters.jobs``.

Datasets are validated completely on the way in (a bad file is a 422 naming the line or the
image); jobs then run in separate training worker processes, never in the serving process.
A file is of one task (``task``: text-classification by default, or image-classification), and
a job takes its task from its training data.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Query, UploadFile
from starlette.concurrency import run_in_threadpool

from adapters.datasets import DatasetLimits, from_records
from adapters.errors import DatasetError
from adapters.quotas import TenantQuotas
from adapters.tasks import IMAGE_CLASSIFICATION, TEXT_CLASSIFICATION
from service.auth import get_state, require_tenant
from service.errors import ApiError
from service.generation import upload_limits
from service.schemas import DB_INT_MAX, FileOut, JobCreate, JobEventOut, JobOut, JobStatus, Task
from service.state import TailorState

State = Annotated[TailorState, Depends(get_state)]
Tenant = Annotated[str, Depends(require_tenant)]

router = APIRouter(tags=["fine-tuning"])
ZIP_MAGIC = b"PK\x03\x04"  # a zip archive's first bytes
# status: an unknown one is a 422 listing the statuses (service.schemas.JobStatus), not an empty list


def _limits(state: TailorState, tenant: str) -> DatasetLimits:
    quotas = TenantQuotas.stored(state.registry.get_tenant(tenant).quotas)
    return dataclasses.replace(quotas.dataset_limits(), max_bytes=state.settings.max_upload_bytes)


def file_out(f: Any) -> dict[str, Any]:
    return {"id": f.id, "task": f.task, "filename": f.filename, "format": f.format, "rows": f.rows, "labels": f.labels,
            "duplicates_dropped": f.duplicates_dropped, "bytes": f.bytes, "created_at": f.created_at}


def job_out(j: Any) -> dict[str, Any]:
    return {
        "id": j.id, "adapter": j.adapter, "task": j.task, "status": j.status, "method": j.method, "promote": j.promote,
        "hyperparameters": j.hyperparameters, "resolved_hyperparameters": j.resolved_hyperparameters,
        "dataset": j.dataset, "progress": j.progress, "metrics": j.metrics, "result": j.result,
        "error": None if j.error is None else {"code": j.error.code, "message": j.error.message},
        "version": j.version, "training_file": j.training_file, "validation_file": j.validation_file,
        "attempts": j.attempts, "cancel_requested": j.cancel_requested, "created_at": j.created_at,
        "started_at": j.started_at, "finished_at": j.finished_at, "queue_position": j.queue_position,
    }


# -- files -----------------------------------------------------------------------------------------

@router.post("/v1/files", status_code=201, response_model=FileOut)
async def upload_file(
    tenant: Tenant, state: State,
    file: Annotated[UploadFile, File(description='text: JSON Lines or CSV of {"text", "label"} rows; images: a zip '
                                                 'of label/<image> folders, or JSON Lines of {"image": base64, '
                                                 '"label"}')],
    format: Annotated[str | None, Form(description="jsonl or csv; for images zip or jsonl (default: from the name "
                                                   "or content)")] = None,
    task: Annotated[Task, Form(description="what the data trains")] = TEXT_CLASSIFICATION,
) -> dict[str, Any]:
    """Upload a training or validation dataset; it is validated completely before it is stored."""
    files, _ = state.require_jobs()
    state.require_task(task, param="task")
    data = await file.read()
    filename = file.filename or "upload"
    if task == TEXT_CLASSIFICATION and data[:4] == ZIP_MAGIC:
        raise DatasetError(f"{filename} is a zip archive; text datasets are JSON Lines or CSV. For an image dataset "
                           f"(a zip of label/<image> folders) upload it with task={IMAGE_CLASSIFICATION}",
                           param="task")

    def run() -> dict[str, Any]:
        limits = upload_limits(state, task, _limits(state, tenant))  # generation: the base's tokenizer
        return file_out(files.upload(tenant, filename, data, limits=limits, format=format, task=task))

    return await run_in_threadpool(run)


@router.get("/v1/files", response_model=list[FileOut])
def list_files(tenant: Tenant, state: State) -> list[dict[str, Any]]:
    files, _ = state.require_jobs()
    return [file_out(f) for f in files.list(tenant)]


@router.get("/v1/files/{file_id}", response_model=FileOut)
def get_file(file_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    files, _ = state.require_jobs()
    return file_out(files.get(tenant, file_id))


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    files, _ = state.require_jobs()
    files.delete(tenant, file_id)
    return {"id": file_id, "deleted": True}


# -- jobs ------------------------------------------------------------------------------------------

def _dataset(state: TailorState, tenant: str, file_id: str | None, records: list[Any] | None, what: str,
             limits: DatasetLimits, required: bool) -> tuple[Any, str | None]:
    """The dataset a job names (an uploaded file, or inline text records) and its task."""
    if file_id is not None and records is not None:
        raise ApiError(422, "invalid_request", f"give {what}_file or {what}_data, not both", param=f"{what}_data")
    if file_id is not None:
        files, _ = state.require_jobs()
        record, dataset = files.load(tenant, file_id)
        return dataset, record.task
    if records is not None:
        try:
            return from_records(records, limits=limits, what=f"{what}_data"), TEXT_CLASSIFICATION
        except DatasetError as e:
            param = e.param if e.param and e.param.startswith(f"{what}_data") else f"{what}_data ({e.param})"
            raise DatasetError(e.message, param=param) from None
    if required:
        raise ApiError(422, "invalid_request", f"give {what}_file (an uploaded file id) or {what}_data",
                       param=f"{what}_file")
    return None, None


@router.post("/v1/jobs", status_code=201, response_model=JobOut)
def create_job(body: JobCreate, tenant: Tenant, state: State) -> dict[str, Any]:
    """Fine-tune a new version of ``adapter`` on a dataset; it trains in a worker process."""
    _, jobs = state.require_jobs()
    limits = _limits(state, tenant)
    training, task = _dataset(state, tenant, body.training_file, body.training_data, "training", limits, True)
    validation, _ = _dataset(state, tenant, body.validation_file, body.validation_data, "validation", limits, False)
    state.require_task(task, param="training_file")  # an adapter of a task not served here could not be used
    engine = state.engines.get(task)  # where loaded, LoRA targets are checked now
    job = jobs.submit(tenant, body.adapter, training=training, validation=validation, method=body.method,
                      hyperparameters=body.hyperparameters, promote=body.promote,
                      training_file=body.training_file, validation_file=body.validation_file,
                      spec=engine.base.spec if engine is not None else None)
    return job_out(job)


@router.get("/v1/jobs", response_model=list[JobOut])
def list_jobs(tenant: Tenant, state: State,
              limit: Annotated[int, Query(ge=1, le=100)] = 20,
              status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
              ) -> list[dict[str, Any]]:
    _, jobs = state.require_jobs()
    return [job_out(j) for j in jobs.list(tenant, limit=limit, status=status)]


@router.get("/v1/jobs/{job_id}", response_model=JobOut)
def get_job(job_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    _, jobs = state.require_jobs()
    return job_out(jobs.get(tenant, job_id))


@router.get("/v1/jobs/{job_id}/events", response_model=list[JobEventOut])
def job_events(job_id: str, tenant: Tenant, state: State,
               after: Annotated[int, Query(ge=0, le=DB_INT_MAX, description="only events with a larger id")] = 0,
               limit: Annotated[int, Query(ge=1, le=1000)] = 1000) -> list[dict[str, Any]]:
    _, jobs = state.require_jobs()
    return [dataclasses.asdict(e) for e in jobs.events(tenant, job_id, after=after, limit=limit)]


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: str, tenant: Tenant, state: State) -> dict[str, Any]:
    """Cancel a job: at once if queued, within seconds if running; nothing gets registered."""
    _, jobs = state.require_jobs()
    return job_out(jobs.cancel(tenant, job_id))
