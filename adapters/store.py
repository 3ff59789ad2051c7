"""Blob store for adapter files (weights, manifests), addressed by validated keys.

Contract of every ``AdapterStore``:

* Keys are ``/``-joined segments, each matching ``[A-Za-z0-9][A-Za-z0-9._-]{0,127}``
  (so never ``.``, ``..`` or a hidden name), no empty segment, no leading or trailing ``/``,
  at most 512 characters. ``validate_key`` is applied to every key and prefix before the
  backend is touched; a bad one raises ``InvalidNameError``.
* A prefix is ``""`` (the whole store) or a valid key with an optional trailing ``/``. It is
  segment-aligned: ``"t1/a"`` and ``"t1/a/"`` both mean "keys strictly under ``t1/a/``" and
  never match ``t1/ab/...``.
* ``put`` is atomic: a reader sees either no key or the complete bytes, never a partial
  file, even if the writer crashes. It returns the sha256 hex of the bytes.
* ``get`` raises ``NotFoundError`` for a missing key, ``ArtifactError`` when the object is
  larger than ``max_bytes`` (checked before reading it), ``ChecksumMismatchError`` when
  ``sha256`` is given and differs. Bytes returned with ``sha256`` given are verified.
* ``delete`` is idempotent; ``list`` is sorted, and so is ``entries`` (the same keys with
  their size and last-modified time, for garbage collection).
* A checksum mismatch is logged (warning, logger ``tailor.store``) as well as raised: it
  means an object changed behind the registry's back.
* A backend that cannot be reached raises ``StoreUnavailableError`` (HTTP 503, retry);
  nothing was half-written.
* Keys are names, not directories. ``LocalStore`` cannot hold both ``a/b`` and ``a/b/c``
  (``ConflictError``); S3 can. Callers never need both: every object is a file name under a
  fresh prefix.

``LocalStore`` keeps one file per key under a root directory. Writes go to a ``.tmp-*``
file in the target directory, are fsynced, renamed over the final name and the directory is
fsynced. ``.tmp-*`` names can never be keys (segments start with a letter or digit), so
leftovers from a crash are invisible to ``list``/``get``; ``cleanup_temp`` removes them.
``S3Store`` (``adapters.store_s3``, ``s3://bucket/prefix?...`` urls, see ``parse_s3_url``)
keeps the same contract on S3-compatible object storage.
"""

from __future__ import annotations

import builtins
import hashlib
import ipaddress
import logging
import os
import re
import stat
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from adapters.errors import (
    ArtifactError,
    ChecksumMismatchError,
    ConflictError,
    InvalidNameError,
    NotFoundError,
)
from adapters.names import MAX_KEY_LENGTH, SEGMENT_PATTERN, validate_key, validate_prefix  # noqa: F401 (re-exported)

TEMP_PREFIX = ".tmp-"

log = logging.getLogger("tailor.store")


@runtime_checkable
class AdapterStore(Protocol):
    """The narrow interface every blob store implements (``LocalStore``, ``S3Store``)."""

    @property
    def url(self) -> str: ...

    def put(self, key: str, data: bytes) -> str: ...

    def get(
        self, key: str, *, sha256: str | None = None, max_bytes: int | None = None
    ) -> bytes: ...

    def delete(self, key: str) -> None: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def exists(self, key: str) -> bool: ...

    def list(self, prefix: str = "") -> builtins.list[str]: ...

    def entries(self, prefix: str = "") -> builtins.list[StoreEntry]: ...

    def cleanup_temp(self, older_than_s: float = 3600) -> int: ...

    def size(self, key: str) -> int: ...


@dataclass(frozen=True)
class StoreEntry:
    key: str
    size: int
    modified: float  # seconds since the epoch, as the backend reports it


def check_size(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ArtifactError(
            f"object {key!r} is {size} bytes, over the limit of {max_bytes} bytes", param="key"
        )


def verify_sha256(key: str, data: bytes, expected: str, *, where: str = "") -> None:
    """Raise ``ChecksumMismatchError`` (and log it) unless ``data`` hashes to ``expected``."""
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected.lower():
        # Refused and logged: someone or something rewrote the object outside put().
        log.warning("checksum mismatch on store object %r%s: expected sha256 %s, got %s; refused",
                    key, where, expected, actual)
        raise ChecksumMismatchError(
            f"object {key!r} is corrupt: expected sha256 {expected}, got {actual}", param="key"
        )


def _fsync_dir(path: Path) -> None:
    # Makes the rename itself durable; some filesystems do not support it, which is fine.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class LocalStore:
    """An ``AdapterStore`` on a local (or mounted) directory."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        path = Path(root)
        path.mkdir(parents=True, exist_ok=True)
        self.root = path.resolve(strict=True)

    def __repr__(self) -> str:
        return f"LocalStore({str(self.root)!r})"

    @property
    def url(self) -> str:
        return self.root.as_uri()

    # -- paths ------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        """The file path for an already validated key, refused if it resolves outside root."""
        path = self.root.joinpath(*key.split("/"))
        # Defence in depth: the key grammar already forbids '..'; this catches symlinks.
        if not path.resolve().is_relative_to(self.root):
            raise InvalidNameError(f"store key {key!r} resolves outside the store", param="key")
        return path

    # -- writes -----------------------------------------------------------------------

    def put(self, key: str, data: bytes) -> str:
        validate_key(key)
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        digest = hashlib.sha256(data).hexdigest()
        path = self._path(key)
        try:
            fd, tmp_name = self._mkstemp(path.parent)
        except (FileExistsError, NotADirectoryError):
            raise ConflictError(
                f"cannot put {key!r}: a parent of it is an existing object", param="key"
            ) from None
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.replace(tmp_name, path)
            except IsADirectoryError:
                raise ConflictError(
                    f"cannot put {key!r}: other objects live under that key", param="key"
                ) from None
        except BaseException:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass
            raise
        _fsync_dir(path.parent)
        return digest

    @staticmethod
    def _mkstemp(directory: Path) -> tuple[int, str]:
        # A concurrent delete_prefix may prune the directory between mkdir and mkstemp.
        for attempt in range(3):
            directory.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(prefix=TEMP_PREFIX, dir=directory)
            except FileNotFoundError:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def delete(self, key: str) -> None:
        validate_key(key)
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            pass

    def delete_prefix(self, prefix: str) -> int:
        prefix = validate_prefix(prefix)
        if prefix == "":
            # One typo away from wiping every tenant: make it impossible by design.
            raise InvalidNameError("refusing to delete the whole store (empty prefix)", param="prefix")
        count = 0
        for key in self.list(prefix):
            try:
                self._path(key).unlink()
                count += 1
            except FileNotFoundError:
                pass
        self._prune(self._path(prefix.rstrip("/")))
        return count

    def _prune(self, top: Path) -> None:
        """Remove empty directories at and below ``top`` (best effort)."""
        if not top.is_dir() or top.is_symlink():
            return
        for dirpath, _dirnames, _files in os.walk(top, topdown=False):
            try:
                os.rmdir(dirpath)
            except OSError:
                pass  # not empty (a concurrent put or a temp file): leave it

    def cleanup_temp(self, older_than_s: float = 3600) -> int:
        """Delete ``.tmp-*`` files left by crashed writers, older than ``older_than_s``."""
        cutoff = time.time() - older_than_s
        removed = 0
        for dirpath, _dirnames, filenames in os.walk(self.root):
            for name in filenames:
                if not name.startswith(TEMP_PREFIX):
                    continue
                path = Path(dirpath, name)
                try:
                    if path.lstat().st_mtime <= cutoff:
                        path.unlink()
                        removed += 1
                except FileNotFoundError:
                    pass  # finished or cleaned concurrently
        return removed

    # -- reads ------------------------------------------------------------------------

    def get(
        self, key: str, *, sha256: str | None = None, max_bytes: int | None = None
    ) -> bytes:
        validate_key(key)
        path = self._path(key)
        try:
            f = open(path, "rb")
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError):
            raise NotFoundError(f"object {key!r} not found", param="key") from None
        with f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise NotFoundError(f"object {key!r} not found", param="key")
            check_size(key, st.st_size, max_bytes)
            # Read at most limit+1 bytes: a file growing after fstat still cannot blow memory.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        check_size(key, len(data), max_bytes)
        if sha256 is not None:
            verify_sha256(key, data, sha256, where=f" in {self.url}")
        return data

    def exists(self, key: str) -> bool:
        validate_key(key)
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        validate_key(key)
        try:
            st = self._path(key).stat()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFoundError(f"object {key!r} not found", param="key") from None
        if not stat.S_ISREG(st.st_mode):
            raise NotFoundError(f"object {key!r} not found", param="key")
        return st.st_size

    def list(self, prefix: str = "") -> builtins.list[str]:
        return [e.key for e in self.entries(prefix)]

    def entries(self, prefix: str = "") -> builtins.list[StoreEntry]:
        prefix = validate_prefix(prefix)
        top = self._path(prefix.rstrip("/")) if prefix else self.root
        if not top.is_dir():
            return []
        found: builtins.list[StoreEntry] = []
        for dirpath, dirnames, filenames in os.walk(top):
            # Never descend into names that cannot be part of a key (temp or hidden dirs).
            dirnames[:] = [d for d in dirnames if SEGMENT_PATTERN.fullmatch(d)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not SEGMENT_PATTERN.fullmatch(name):
                    continue  # .tmp-* leftovers and stray files are not keys
                key = name if rel == "." else f"{rel}/{name}"
                try:
                    st = Path(dirpath, name).lstat()
                except FileNotFoundError:
                    continue  # deleted while we walked
                # Symlinks are never written by put; skipping them keeps list inside root.
                if len(key) <= MAX_KEY_LENGTH and stat.S_ISREG(st.st_mode):
                    found.append(StoreEntry(key, st.st_size, st.st_mtime))
        found.sort(key=lambda e: e.key)
        return found


# -- s3:// urls ---------------------------------------------------------------------------

BUCKET_PATTERN = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
ADDRESSING_STYLES = ("auto", "path", "virtual")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class S3Location:
    """A parsed ``s3://`` store url (no credentials: those come from the AWS environment)."""

    bucket: str
    prefix: str = ""  # "" or "a/b/": every object name is prefix + key
    endpoint_url: str | None = None
    region: str | None = None
    create_bucket: bool = False
    addressing_style: str | None = None
    connect_timeout: float = 2.0
    read_timeout: float = 10.0
    max_attempts: int = 2

    def url(self) -> str:
        """The canonical url: round-trips through ``parse_s3_url``; ``create_bucket`` dropped
        (it is a one-off setup action, not part of the store's identity)."""
        query: dict[str, str] = {}
        if self.endpoint_url:
            query["endpoint_url"] = self.endpoint_url
        if self.region:
            query["region"] = self.region
        if self.addressing_style:
            query["addressing_style"] = self.addressing_style
        defaults = S3Location(self.bucket)
        for name in ("connect_timeout", "read_timeout", "max_attempts"):
            if getattr(self, name) != getattr(defaults, name):
                query[name] = f"{getattr(self, name):g}"
        tail = f"?{urlencode(query, safe=':/')}" if query else ""
        path = f"/{self.prefix.rstrip('/')}" if self.prefix else ""
        return f"s3://{self.bucket}{path}{tail}"


def validate_bucket(name: str) -> str:
    """S3 bucket naming rules (the portable subset MinIO and Ceph also accept)."""
    if (not isinstance(name, str) or not BUCKET_PATTERN.fullmatch(name) or ".." in name
            or ".-" in name or "-." in name):
        raise ValueError(
            f"invalid S3 bucket name {name!r}: 3-63 characters of a-z, 0-9, '.' and '-', "
            "starting and ending with a letter or digit")
    try:
        ipaddress.IPv4Address(name)
    except ValueError:
        return name
    raise ValueError(f"invalid S3 bucket name {name!r}: must not look like an IP address")


def _number(name: str, value: str, low: float, high: float) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ValueError(f"s3 url option {name}={value!r} is not a number") from None
    if not low <= number <= high:
        raise ValueError(f"s3 url option {name}={value!r} is out of range [{low:g}, {high:g}]")
    return number


def parse_s3_url(url: str, env: Mapping[str, str] | None = None) -> S3Location:
    """Parse ``s3://bucket[/prefix][?endpoint_url=..&region=..&create_bucket=1&...]``.

    Options: ``endpoint_url`` (else env ``TAILOR_S3_ENDPOINT_URL``, ``AWS_ENDPOINT_URL_S3``,
    ``AWS_ENDPOINT_URL``; else AWS), ``region``, ``create_bucket`` (tests and the local
    cluster only), ``addressing_style`` (``path`` by default when an endpoint is set, as
    MinIO and moto want), ``connect_timeout`` / ``read_timeout`` (seconds, default 2 / 10),
    ``max_attempts`` (total tries per call, default 2). Pure: touches no network.
    """
    if env is None:
        env = os.environ
    parts = urlsplit(url)
    if parts.scheme.lower() != "s3":
        raise ValueError(f"not an s3:// url: {url!r}")
    if parts.username or parts.password or "@" in parts.netloc:
        raise ValueError("s3 url must not carry credentials; use the AWS environment variables")
    bucket = validate_bucket(parts.netloc)
    path = unquote(parts.path).strip("/")
    try:
        prefix = validate_prefix(path)
    except InvalidNameError as exc:
        raise ValueError(f"s3 url {url!r}: {exc.message}") from None
    opts: dict[str, str] = {}
    for name, value in parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False):
        if name in opts:
            raise ValueError(f"s3 url option {name!r} given twice")
        opts[name] = value
    known = {"endpoint_url", "region", "create_bucket", "addressing_style", "connect_timeout",
             "read_timeout", "max_attempts"}
    unknown = sorted(set(opts) - known)
    if unknown:
        raise ValueError(f"unknown s3 url option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    endpoint = (opts.get("endpoint_url") or env.get("TAILOR_S3_ENDPOINT_URL")
                or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None)
    if endpoint is not None:
        ep = urlsplit(endpoint)
        if ep.scheme not in ("http", "https") or not ep.hostname:
            raise ValueError(f"s3 endpoint_url {endpoint!r} must be an http(s):// url with a host")
        endpoint = endpoint.rstrip("/")
    create = opts.get("create_bucket", "0").lower()
    if create not in _TRUE + _FALSE:
        raise ValueError(f"s3 url option create_bucket={opts['create_bucket']!r}: use 1/0 or true/false")
    style = opts.get("addressing_style") or ("path" if endpoint else None)
    if style is not None and style not in ADDRESSING_STYLES:
        raise ValueError(f"s3 url option addressing_style={style!r}: one of {', '.join(ADDRESSING_STYLES)}")
    return S3Location(
        bucket=bucket, prefix=prefix, endpoint_url=endpoint, region=opts.get("region") or None,
        create_bucket=create in _TRUE, addressing_style=style,
        connect_timeout=_number("connect_timeout", opts.get("connect_timeout", "2"), 0.05, 300),
        read_timeout=_number("read_timeout", opts.get("read_timeout", "10"), 0.05, 3600),
        max_attempts=int(_number("max_attempts", opts.get("max_attempts", "2"), 1, 10)),
    )


def open_store(url: str) -> AdapterStore:
    """Open the store named by ``url``: ``file:///abs/path``, a plain path, or ``s3://...``
    (see ``parse_s3_url``)."""
    if not isinstance(url, str) or not url:
        raise ValueError("store url must be a non-empty string")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise ValueError(f"file store url {url!r} names a remote host; use file:///abs/path")
        if not parts.path:
            raise ValueError(f"file store url {url!r} has no path")
        return LocalStore(unquote(parts.path))
    if scheme == "s3":
        from adapters.store_s3 import S3Store  # boto3 is imported only by those who use S3

        return S3Store(parse_s3_url(url))
    if scheme and len(scheme) > 1:  # a one-letter 'scheme' is a Windows drive letter
        raise ValueError(f"unsupported store url scheme {scheme!r} in {url!r}")
    return LocalStore(url)
