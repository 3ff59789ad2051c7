"""Errors raised by the adapters library.

Every error carries a stable machine-readable ``code`` so the HTTP layer can map it to a
status without string matching. ``param`` names the offending field or row when there is one.
"""

from __future__ import annotations


class TailorError(Exception):
    """Base of every error this library raises on purpose."""

    code = "tailor_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidNameError(TailorError, ValueError):
    """A tenant, adapter, alias or store key fails validation."""

    code = "invalid_name"


class NotFoundError(TailorError, LookupError):
    """Something looked up does not exist (or belongs to another tenant: same error, no leak)."""

    code = "not_found"


class AdapterNotFoundError(NotFoundError):
    code = "adapter_not_found"


class ConflictError(TailorError):
    """The request conflicts with current state (name taken, version exists, ...)."""

    code = "conflict"


class InvalidTaskError(TailorError, ValueError):
    """A task name that is not one of ``adapters.tasks.TASK_NAMES`` (HTTP 422)."""

    code = "invalid_task"


class AdapterTaskError(ConflictError):
    """An adapter's versions all have one task kind: this one is of another."""

    code = "adapter_task_mismatch"


class ArtifactError(TailorError, ValueError):
    """An adapter artifact is malformed, oversized or does not fit the base model."""

    code = "invalid_artifact"


class TaskMismatchError(ArtifactError):
    """The adapter is of another task kind than the base it was given to (text vs image)."""

    code = "task_mismatch"


class ChecksumMismatchError(ArtifactError):
    """Bytes read back do not match the sha256 recorded when they were written."""

    code = "checksum_mismatch"


class FingerprintMismatchError(ArtifactError):
    """The adapter was trained on a different base model than the one loaded."""

    code = "base_mismatch"


class CapacityError(TailorError):
    """A bounded resource (device slots, resident cache) cannot take the request right now."""

    code = "capacity"


class UnavailableError(TailorError):
    """A backing service (registry database, object store) cannot be reached right now.

    The request may succeed if retried; nothing was half-written (HTTP 503 with a reason).
    """

    code = "unavailable"


class DatabaseUnavailableError(UnavailableError):
    code = "database_unavailable"


class StoreUnavailableError(UnavailableError):
    code = "store_unavailable"


class DatasetError(TailorError, ValueError):
    """A training or validation dataset is malformed, too large or unusable for training.

    ``line`` is the 1-based physical line in the uploaded file where the problem is, when
    there is one (``None`` for whole-file problems and for in-memory records).
    """

    code = "invalid_dataset"

    def __init__(self, message: str, *, param: str | None = None, line: int | None = None) -> None:
        super().__init__(message, param=param)
        self.line = line


class InvalidInputError(TailorError, ValueError):
    """An input row cannot be served as given (e.g. text that is not valid Unicode).

    ``param`` names the row (``inputs[3]``); the request fails before it is queued.
    """

    code = "invalid_input"


class AdapterOutputError(ConflictError):
    """An adapter version produces non-finite outputs: its rows fail, no other row does."""

    code = "adapter_output_not_finite"


class TenantBusyError(TailorError):
    """A tenant already has as many rows waiting as it may: refused before queueing.

    ``retry_after`` is a hint in seconds (HTTP 429 with Retry-After).
    """

    code = "tenant_queue_full"

    def __init__(self, message: str, *, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class AdmissionError(TailorError):
    """A generation request cannot be admitted within the configured wait: the KV-cache budget
    is taken by running sequences, or the waiting queue is full. Nothing was started.

    ``retry_after`` is a hint in seconds (HTTP 429, or 503 when the server as a whole is
    saturated, with Retry-After).
    """

    code = "admission_refused"

    def __init__(self, message: str, *, retry_after: float = 1.0, reason: str = "kv_budget") -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.reason = reason  # "kv_budget" or "queue_full"
