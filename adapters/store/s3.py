"""``S3Store``: the adapter store on S3-compatible object storage (AWS S3, MinIO, Ceph, moto).

Selected by ``open_store("s3://bucket/prefix?endpoint_url=...&region=...")``; the url grammar
and its options are ``adapters.store.s3_url.parse_s3_url``; the client, the bucket check at
opening and the translation of faults are ``adapters.store.s3_client``'s (credentials come
from the AWS environment, never from the url).

Contract: the one of ``adapters.store.protocol.AdapterStore`` (same key grammar, same errors), on S3.

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
* **Faults and opening** as ``adapters.store.s3_client`` states: an unreachable or failing
  server raises ``StoreUnavailableError`` (503, nothing published), a missing object
  ``NotFoundError``; a missing bucket is a ``StoreConfigError`` at opening unless the url says
  ``create_bucket=1``, an unreachable one is only logged.
* Unlike a directory tree, S3 can hold both ``a/b`` and ``a/b/c``; no caller needs that and
  ``LocalStore`` refuses it (``ConflictError``). ``delete`` is idempotent; ``list`` is sorted.
"""

from __future__ import annotations

import base64
import builtins
import hashlib
import logging
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from adapters.errors import InvalidNameError, NotFoundError, StoreUnavailableError
from adapters.names import MAX_KEY_LENGTH, SEGMENT_PATTERN, validate_key, validate_prefix
from adapters.store.protocol import StoreEntry, check_size, verify_sha256
from adapters.store.s3_client import Faults, StoreConfigError, connect, open_bucket
from adapters.store.s3_url import S3Location, parse_s3_url

__all__ = ["S3Store", "StoreConfigError"]

log = logging.getLogger("tailor.store")

TEMP_DIR = ".tmp"  # never a valid key segment: temp objects are invisible as keys
READ_CHUNK = 1 << 20
DELETE_BATCH = 1000  # the DeleteObjects limit


class _NotVerified(StoreUnavailableError):
    """The server answered, but what it stored is not what we sent (nothing was published)."""


def _is_key(name: str) -> bool:
    return len(name) <= MAX_KEY_LENGTH and all(SEGMENT_PATTERN.fullmatch(s) for s in name.split("/"))


class S3Store:
    """An ``AdapterStore`` on one bucket (and optional key prefix) of S3-compatible storage."""

    def __init__(self, location: S3Location | str, *, session: boto3.session.Session | None = None,
                 check_bucket: bool = True) -> None:
        self.location = parse_s3_url(location) if isinstance(location, str) else location
        self.bucket, self.prefix = self.location.bucket, self.location.prefix
        self._client, self.region = connect(self.location, session)
        self._faults = Faults(self.location)
        if check_bucket:
            open_bucket(self._client, self.location, self.region, self._faults.where)

    def __repr__(self) -> str:
        return f"S3Store({self.url!r})"

    @property
    def url(self) -> str:
        return self.location.url()

    def close(self) -> None:
        self._client.close()

    def _name(self, key: str) -> str:
        return self.prefix + key

    def _temp_name(self) -> str:
        return f"{self.prefix}{TEMP_DIR}/{uuid.uuid4().hex}"

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
            with self._faults.during("put"):
                self._client.put_object(
                    Bucket=self.bucket, Key=temp, Body=body, Metadata={"sha256": digest},
                    ChecksumAlgorithm="SHA256", ChecksumSHA256=checksum,
                    ContentType="application/octet-stream",
                )
                head = self._client.head_object(Bucket=self.bucket, Key=temp, ChecksumMode="ENABLED")
            self._verify_written(key, head, len(body), digest, checksum)
            with self._faults.during("put"):
                copied = self._client.copy_object(
                    Bucket=self.bucket, Key=self._name(key),
                    CopySource={"Bucket": self.bucket, "Key": temp},
                    MetadataDirective="COPY", ChecksumAlgorithm="SHA256",
                )
            server_sum = copied.get("CopyObjectResult", {}).get("ChecksumSHA256")
            if server_sum and server_sum != checksum:
                # The final key already holds bad bytes: take them away again.
                self._delete_quietly(self._name(key))
                raise self._faults.unavailable("put", f"copy of {key!r} came out with checksum {server_sum}", _NotVerified)
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
            raise self._faults.unavailable("put", f"upload of {key!r} did not verify: {'; '.join(problems)}", _NotVerified)

    def _delete_quietly(self, name: str) -> None:
        try:
            self._client.delete_object(Bucket=self.bucket, Key=name)
        except (ClientError, BotoCoreError, OSError) as e:
            # Left for cleanup_temp; never a visible key.
            log.warning("could not delete s3://%s/%s (%s); cleanup_temp will", self.bucket, name, e)

    def delete(self, key: str) -> None:
        validate_key(key)
        with self._faults.during("delete"):
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
            with self._faults.during(op):
                out = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": n} for n in batch], "Quiet": True})
            errors = out.get("Errors") or []
            deleted += len(batch) - len(errors)
            if errors:
                first = errors[0]
                raise self._faults.unavailable(op, f"{len(errors)} objects not deleted, e.g. {first.get('Key')!r}: "
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
        with self._faults.during("get", key):
            response = self._client.get_object(Bucket=self.bucket, Key=self._name(key))
        body = response["Body"]
        try:
            # Refused from the size alone: a huge object is never downloaded.
            check_size(key, int(response.get("ContentLength", 0)), max_bytes)
            with self._faults.during("get", key):
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
        with self._faults.during(op, key):
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
        with self._faults.during(op):
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
