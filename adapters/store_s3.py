"""``S3Store``: the adapter store on S3-compatible object storage (AWS S3, MinIO, Ceph, moto).

Selected by ``open_store("s3://bucket/prefix?endpoint_url=...&region=...")``; the url grammar
and its options are ``adapters.store.parse_s3_url``. Credentials never appear in the url: they
come from the standard AWS chain (``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles,
instance roles) or from an explicit ``boto3`` session.

Contract: the one of ``adapters.store.AdapterStore`` (same key grammar, same errors), on S3.

* **Validated first.** Every key and prefix goes through ``validate_key``/``validate_prefix``
  before any request is made; object names are ``<prefix>/<key>``.
* **Atomic, verified put.** The bytes are uploaded to a temporary object
  ``<prefix>/.tmp/<uuid>`` with their sha256 as user metadata (``x-amz-meta-sha256``) and as
  ``x-amz-checksum-sha256``, which S3 itself checks against the body where it supports it.
  The temporary object is then checked (HEAD: size, recorded sha256, and S3's own SHA-256
  checksum when the server reports one) and only then copied server-side to the final key,
  after which the temporary object is deleted. S3 makes each PUT/COPY atomic, so a reader
  sees the previous object or the complete new one, and the final key only ever receives
  bytes that passed verification. ``.tmp`` can never be a key segment (segments start with a
  letter or digit), so temporary objects are never listed or readable as keys; a writer that
  dies (or loses the server mid-put) leaves at most one, which ``cleanup_temp`` removes once
  it is old enough -- or a bucket lifecycle rule expiring ``<prefix>/.tmp/`` after a day.
* **Verified get.** ``ContentLength`` is checked against ``max_bytes`` before the body is
  read, and the body read is bounded too. With ``sha256`` given (the registry's record), the
  bytes are hashed and a mismatch -- the object changed behind the registry's back -- is
  refused with ``ChecksumMismatchError`` and logged. Without it, the sha256 that ``put``
  recorded in the metadata is checked when present.
* **Faults.** A server that cannot be reached (refused, reset, timed out), answers 5xx or
  throttles, refuses the credentials, or has lost the bucket raises ``StoreUnavailableError``
  (HTTP 503 with Retry-After): the request may work later, nothing was published. Its message
  names no endpoint (it reaches API clients); the details are logged. A missing object raises
  ``NotFoundError``, like ``LocalStore``. Timeouts are short (connect 2 s, read 10 s) and a
  call is tried at most twice, so an unreachable endpoint fails in seconds, not minutes.
* **Opening.** The bucket is checked once (HEAD bucket). A bucket that does not exist is a
  configuration error (``StoreConfigError``, a ``ValueError``) unless the url says
  ``create_bucket=1`` (tests, the local cluster). A server that cannot be reached at that
  moment is only logged: the store opens, every call raises ``StoreUnavailableError`` until
  the server is back, so a replica can start (and serve resident adapters) during an outage.
* Unlike a directory tree, S3 can hold both ``a/b`` and ``a/b/c``; no caller needs that and
  ``LocalStore`` refuses it (``ConflictError``). ``delete`` is idempotent; ``list`` is sorted.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from adapters.errors import InvalidNameError, NotFoundError, StoreUnavailableError
from adapters.store import (
    MAX_KEY_LENGTH,
    SEGMENT_PATTERN,
    S3Location,
    StoreEntry,
    check_size,
    parse_s3_url,
    validate_key,
    validate_prefix,
    verify_sha256,
)

log = logging.getLogger("tailor.store")

TEMP_DIR = ".tmp"  # never a valid key segment: temp objects are invisible as keys
READ_CHUNK = 1 << 20
DELETE_BATCH = 1000  # the DeleteObjects limit
WARN_EVERY_S = 5.0  # an outage hits every request; one log line per few seconds is enough
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}


class StoreConfigError(ValueError):
    """The store url names something that cannot work (a missing bucket, refused credentials)."""


class _NotVerified(StoreUnavailableError):
    """The server answered, but what it stored is not what we sent (nothing was published)."""


_loader: botocore.loaders.Loader | None = None


def _new_session() -> boto3.session.Session:
    """A fresh session (credentials resolved anew) that shares one model loader: parsing the
    S3 service model is most of the cost of a client, and it never changes."""
    global _loader
    if _loader is None:
        _loader = botocore.loaders.create_loader()
    core = botocore.session.get_session()
    core.register_component("data_loader", _loader)
    return boto3.session.Session(botocore_session=core)


def _is_key(name: str) -> bool:
    return len(name) <= MAX_KEY_LENGTH and all(SEGMENT_PATTERN.fullmatch(s) for s in name.split("/"))


class S3Store:
    """An ``AdapterStore`` on one bucket (and optional key prefix) of S3-compatible storage."""

    def __init__(self, location: S3Location | str, *, session: boto3.session.Session | None = None,
                 check_bucket: bool = True) -> None:
        self.location = parse_s3_url(location) if isinstance(location, str) else location
        loc = self.location
        self.bucket, self.prefix = loc.bucket, loc.prefix
        session = session or _new_session()
        # A custom endpoint (MinIO, moto) still needs some region to sign requests with.
        region = loc.region or session.region_name or ("us-east-1" if loc.endpoint_url else None)
        config = Config(
            connect_timeout=loc.connect_timeout, read_timeout=loc.read_timeout,
            retries={"total_max_attempts": loc.max_attempts, "mode": "standard"},
            s3={"addressing_style": loc.addressing_style} if loc.addressing_style else None,
            max_pool_connections=32,
            # botocore's default CRC32 trailers trip older S3-compatible servers; we send and
            # check our own SHA-256 instead.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._client: Any = session.client("s3", endpoint_url=loc.endpoint_url, region_name=region,
                                           config=config)
        self.region = region
        self._last_warning = 0.0
        if check_bucket:
            self._check_bucket()

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def url(self) -> str:
        return self.location.url()

    def close(self) -> None:
        self._client.close()

    # -- names and errors ---------------------------------------------------------------

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _temp_name(self) -> str:
        return f"{self.prefix}{TEMP_DIR}/{uuid.uuid4().hex}"

    def _where(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" + (f" at {self.location.endpoint_url}"
                                                      if self.location.endpoint_url else "")

    def _unavailable(self, op: str, reason: str,
                     cls: type[StoreUnavailableError] = StoreUnavailableError) -> StoreUnavailableError:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("object store %s unavailable during %s: %s", self._where(), op, reason)
        else:
            log.debug("object store %s unavailable during %s: %s", self._where(), op, reason)
        # No endpoint or bucket in the message: it is shown to API clients.
        return cls(f"the adapter store is unavailable ({op}: {reason.split(':')[0]}); retry shortly")

    @contextmanager
    def _s3(self, op: str, key: str | None = None) -> Iterator[None]:
        """Translate boto3's errors: missing object -> NotFoundError, the rest -> 503."""
        try:
            yield
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if key is not None and code in _NOT_FOUND_CODES:
                raise NotFoundError(f"object {key!r} not found", param="key") from None
            reason = "bucket does not exist" if code == "NoSuchBucket" else f"{code or status} {err.get('Message', '')}"
            raise self._unavailable(op, reason.strip()) from e
        except ParamValidationError:
            raise  # a bug here, not an outage
        except (BotoCoreError, OSError) as e:
            # Connection refused/reset, timeouts, truncated bodies, missing credentials.
            raise self._unavailable(op, f"{type(e).__name__}: {e}") from e

    def _check_bucket(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code", ""))
            if code in _MISSING_BUCKET_CODES:
                if self.location.create_bucket:
                    self._create_bucket()
                    return
                raise StoreConfigError(
                    f"S3 bucket {self.bucket!r} does not exist{' at ' + self.location.endpoint_url if self.location.endpoint_url else ''}; "
                    "create it first (buckets are only created with create_bucket=1 in the store url)"
                ) from None
            if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise StoreConfigError(
                    f"S3 bucket {self.bucket!r}: access denied ({code}); check the AWS credentials "
                    "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or profile) and the bucket policy"
                ) from None
            reason = f"{code} {e.response.get('Error', {}).get('Message', '')}".strip()
        except ParamValidationError:
            raise
        except (BotoCoreError, OSError) as e:
            reason = f"{type(e).__name__}: {e}"
        # Unreachable now: open anyway, so serving resident adapters does not wait for S3.
        log.warning("object store %s unreachable at start (%s); calls fail with 503 until it answers",
                    self._where(), reason)

    def _create_bucket(self) -> None:
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.region and self.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.region}
        try:
            self._client.create_bucket(**kwargs)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise StoreConfigError(f"cannot create S3 bucket {self.bucket!r}: {e}") from None
        log.info("created S3 bucket %s", self.bucket)

    # -- writes -------------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        body = bytes(data)
        raw = hashlib.sha256(body).digest()
        digest, checksum = raw.hex(), base64.b64encode(raw).decode()
        temp = self._temp_name()
        reachable = True
        try:
            with self._s3("put"):
                self._client.put_object(
                    Bucket=self.bucket, Key=temp, Body=body, Metadata={"sha256": digest},
                    ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                    ContentType="application/octet-stream",
                )
                head = self._client.head_object(Bucket=self.bucket, Key=temp, ChecksumMode="ENABLED")
            self._verify_written(key, head, len(body), digest, checksum)
            with self._s3("put"):
                copied = self._client.copy_object(
                    Bucket=self.bucket, Key=self._name(key),
                    CopySource={"Bucket": self.bucket, "Key": temp},
                    MetadataDirective="COPY", ChecksumAlgorithm="SHA256",
                )
            server_sum = copied.get("CopyObjectResult", {}).get("ChecksumSHA256")
            if server_sum and server_sum != checksum:
                # The final key already holds bad bytes: take them away again.
                self._delete_quietly(self._name(key))
                raise self._unavailable("put", f"copy of {key!r} came out with checksum {server_sum}", _NotVerified)
        except StoreUnavailableError as e:
            # A server that just failed to answer would make the clean-up wait out the same
            # timeouts again; the temp object (if any) is left to cleanup_temp instead.
            reachable = isinstance(e, _NotVerified)
            raise
        finally:
            if reachable:
                self._delete_quietly(temp)
        return digest

    def _verify_written(self, key: str, head: dict[str, Any], size: int, digest: str, checksum: str) -> None:
        problems = []
        if head.get("ContentLength") != size:
            problems.append(f"size {head.get('ContentLength')} != {size}")
        if head.get("Metadata", {}).get("sha256") != digest:
            problems.append("sha256 metadata differs")
        server_sum = head.get("ChecksumSHA256")
        if server_sum and server_sum != checksum:  # servers without SHA-256 support omit it
            problems.append(f"server checksum {server_sum} != {checksum}")
        if problems:
            raise self._unavailable("put", f"upload of {key!r} did not verify: {'; '.join(problems)}", _NotVerified)

    def _delete_quietly(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError, OSError) as e:
            # Left for cleanup_temp; never a visible key.
            log.warning("could not delete s3://%s/%s (%s); cleanup_temp will", self.bucket, name, e)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._s3("delete"):
            self._client.delete_object(Bucket=self.bucket, Key=self._name(key))

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_prefix(prefix)
        if prefix == "":
            # One typo away from wiping every tenant: make it impossible by design.
            raise InvalidNameError("refusing to delete the whole store (empty prefix)", param="prefix")
        return self._delete_names([self._name(k) for k in self.list(prefix)], "delete_prefix")

    def _delete_names(self, names: builtins.list[str], op: str) -> int:
        deleted = 0
        for i in range(0, len(names), DELETE_BATCH):
            batch = names[i:i + DELETE_BATCH]
            with self._s3(op):
                out = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True})
            errors = out.get("Errors") or []
            deleted += len(batch) - len(errors)
            if errors:
                first = errors[0]
                raise self._unavailable(op, f"{len(errors)} objects not deleted, e.g. {first.get('Key')!r}: "
                                            f"{first.get('Code')} {first.get('Message', '')}")
        return deleted

    def cleanup_temp(self, older_than_s: float = 3600) -> int:
        """Delete temporary objects left by crashed writers, older than ``older_than_s``."""
        cutoff = datetime.now(timezone.utc) - timedelta(seconds=older_than_s)
        stale = [obj["Key"] for obj in self._objects(f"{self.prefix}{TEMP_DIR}/", "cleanup_temp")
                 if obj["LastModified"] <= cutoff]
        return self._delete_names(stale, "cleanup_temp")

    # -- reads --------------------------------------------------------------------------

    def get(self, key: str, *, sha256: str | None = None, max_bytes: int | None = None) -> bytes:
        validate_key(key)
        with self._s3("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
        body = response["Body"]
        try:
            # Refused from the size alone: a huge object is never downloaded.
            check_size(key, int(response.get("ContentLength", 0)), max_bytes)
            with self._s3("get", key):
                data = self._read(body, max_bytes)
        finally:
            body.close()
        check_size(key, len(data), max_bytes)
        where = f" in {self.url}"
        if sha256 is not None:
            verify_sha256(key, data, sha256, where=where)
        elif recorded := response.get("Metadata", {}).get("sha256"):
            verify_sha256(key, data, recorded, where=where)
        return data

    @staticmethod
    def _read(body: Any, max_bytes: int | None) -> bytes:
        if max_bytes is None:
            return bytes(body.read())
        chunks, total = [], 0
        while total <= max_bytes:  # at most max_bytes + 1 bytes, then check_size refuses
            chunk = body.read(min(READ_CHUNK, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        return b"".join(chunks)

    def _head(self, key: str, op: str) -> dict[str, Any]:
        validate_key(key)
        with self._s3(op, key):
            return dict(self._client.head_object(Bucket=self.bucket, Key=self._name(key)))

    def exists(self, key: str) -> bool:
        try:
            self._head(key, "exists")
        except NotFoundError:
            return False
        return True

    def size(self, key: str) -> int:
        return int(self._head(key, "size")["ContentLength"])

    def _objects(self, name_prefix: str, op: str) -> Iterator[dict[str, Any]]:
        pages = self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=name_prefix)
        with self._s3(op):
            for page in pages:
                yield from page.get("Contents", [])

    def list(self, prefix: str = "") -> builtins.list[str]:
        return [e.key for e in self.entries(prefix)]

    def entries(self, prefix: str = "") -> builtins.list[StoreEntry]:
        prefix = validate_prefix(prefix)
        start = len(self.prefix)
        found = [StoreEntry(obj["Key"][start:], int(obj["Size"]), obj["LastModified"].timestamp())
                 for obj in self._objects(self._name(prefix), "list")]
        # Temp objects and anything written around us that is not a valid key stay invisible.
        return sorted((e for e in found if _is_key(e.key)), key=lambda e: e.key)
