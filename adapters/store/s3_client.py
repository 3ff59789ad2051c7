"""Connecting ``S3Store`` to S3: the client, the bucket check at opening, and fault translation.

Credentials never appear in a store url: they come from the standard AWS chain
(``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, profiles, instance roles) or from an
explicit ``boto3`` session. Contract:

* **Faults.** A server that cannot be reached (refused, reset, timed out), answers 5xx or
  throttles, refuses the credentials, or has lost the bucket raises ``StoreUnavailableError``
  (HTTP 503 with Retry-After): the request may work later, nothing was published. Its message
  names no endpoint (it reaches API clients); the details are logged (logger ``tailor.store``,
  one warning per few seconds, the rest at debug). A missing object raises ``NotFoundError``,
  like ``LocalStore``. Timeouts are short (connect 2 s, read 10 s) and a call is tried at most
  twice, so an unreachable endpoint fails in seconds, not minutes.
* **Opening.** The bucket is checked once (HEAD bucket). A bucket that does not exist is a
  configuration error (``StoreConfigError``, a ``ValueError``) unless the url says
  ``create_bucket=1`` (tests, the local cluster). A server that cannot be reached at that
  moment is only logged: the store opens, every call raises ``StoreUnavailableError`` until
  the server is back, so a replica can start (and serve resident adapters) during an outage.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import boto3
import botocore.loaders
import botocore.session
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError, ParamValidationError

from adapters.errors import NotFoundError, StoreUnavailableError
from adapters.store.s3_url import S3Location

log = logging.getLogger("tailor.store")

WARN_EVERY_S = 5.0  # an outage hits every request; one log line per few seconds is enough
_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_MISSING_BUCKET_CODES = {"NoSuchBucket", "404", "NotFound"}
_DENIED_CODES = ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch")


class StoreConfigError(ValueError):
    """The store url names something that cannot work (a missing bucket, refused credentials)."""


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


def connect(loc: S3Location, session: boto3.session.Session | None = None) -> tuple[Any, str | None]:
    """An S3 client for ``loc`` (short timeouts, few tries) and the region it signs with."""
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
    client = session.client("s3", endpoint_url=loc.endpoint_url, region_name=region, config=config)
    return client, region


class Faults:
    """Turns boto3's errors on one store into the store's own, logging the details."""

    def __init__(self, loc: S3Location) -> None:
        self.where = f"s3://{loc.bucket}/{loc.prefix}" + (f" at {loc.endpoint_url}" if loc.endpoint_url else "")
        self._last_warning = 0.0

    def unavailable(self, op: str, reason: str,
                    cls: type[StoreUnavailableError] = StoreUnavailableError) -> StoreUnavailableError:
        now = time.monotonic()
        if now - self._last_warning >= WARN_EVERY_S:
            self._last_warning = now
            log.warning("object store %s unavailable during %s: %s", self.where, op, reason)
        else:
            log.debug("object store %s unavailable during %s: %s", self.where, op, reason)
        # No endpoint or bucket in the message: it is shown to API clients.
        return cls(f"the adapter store is unavailable ({op}: {reason.split(':')[0]}); retry shortly")

    @contextmanager
    def during(self, op: str, key: str | None = None) -> Iterator[None]:
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
            raise self.unavailable(op, reason.strip()) from e
        except ParamValidationError:
            raise  # a bug here, not an outage
        except (BotoCoreError, OSError) as e:
            # Connection refused/reset, timeouts, truncated bodies, missing credentials.
            raise self.unavailable(op, f"{type(e).__name__}: {e}") from e


def open_bucket(client: Any, loc: S3Location, region: str | None, where: str) -> None:
    """HEAD the bucket once: create it if the url asks, refuse a missing or forbidden one,
    only log one that cannot be reached now."""
    try:
        client.head_bucket(Bucket=loc.bucket)
        return
    except ClientError as e:
        code = str(e.response.get("Error", {}).get("Code", ""))
        if code in _MISSING_BUCKET_CODES:
            if loc.create_bucket:
                _create_bucket(client, loc.bucket, region)
                return
            raise StoreConfigError(
                f"S3 bucket {loc.bucket!r} does not exist{' at ' + loc.endpoint_url if loc.endpoint_url else ''}; "
                "create it first (buckets are only created with create_bucket=1 in the store url)"
            ) from None
        if code in _DENIED_CODES:
            raise StoreConfigError(
                f"S3 bucket {loc.bucket!r}: access denied ({code}); check the AWS credentials "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or profile) and the bucket policy"
            ) from None
        reason = f"{code} {e.response.get('Error', {}).get('Message', '')}".strip()
    except ParamValidationError:
        raise
    except (BotoCoreError, OSError) as e:
        reason = f"{type(e).__name__}: {e}"
    # Unreachable now: open anyway, so serving resident adapters does not wait for S3.
    log.warning("object store %s unreachable at start (%s); calls fail with 503 until it answers",
                where, reason)


def _create_bucket(client: Any, bucket: str, region: str | None) -> None:
    kwargs: dict[str, Any] = {"Bucket": bucket}
    if region and region != "us-east-1":
        kwargs["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        client.create_bucket(**kwargs)
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
            raise StoreConfigError(f"cannot create S3 bucket {bucket!r}: {e}") from None
    log.info("created S3 bucket %s", bucket)
