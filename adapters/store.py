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
* ``delete`` is idempotent; ``list`` is sorted.

``LocalStore`` keeps one file per key under a root directory. Writes go to a ``.tmp-*``
file in the target directory, are fsynced, renamed over the final name and the directory is
fsynced. ``.tmp-*`` names can never be keys (segments start with a letter or digit), so
leftovers from a crash are invisible to ``list``/``get``; ``cleanup_temp`` removes them.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import re
import stat
import tempfile
import time
from pathlib import Path
from typing import Protocol, runtime_checkable
from urllib.parse import unquote, urlsplit

from adapters.errors import (
    ArtifactError,
    ChecksumMismatchError,
    ConflictError,
    InvalidNameError,
    NotFoundError,
)

MAX_KEY_LENGTH = 512
SEGMENT_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
TEMP_PREFIX = ".tmp-"


@runtime_checkable
class AdapterStore(Protocol):
    """The narrow interface every blob store implements (local now, S3 later)."""

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

    def size(self, key: str) -> int: ...


def _shown(value: str) -> str:
    return repr(value if len(value) <= 80 else value[:77] + "...")


def validate_key(key: object) -> str:
    """Return ``key`` unchanged if it is a valid store key, else raise InvalidNameError."""
    if not isinstance(key, str):
        raise InvalidNameError(f"store key must be a string, got {type(key).__name__}", param="key")
    if not key:
        raise InvalidNameError("store key must not be empty", param="key")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidNameError(
            f"store key {_shown(key)} is {len(key)} characters; the limit is {MAX_KEY_LENGTH}",
            param="key",
        )
    for segment in key.split("/"):
        # fullmatch, not match+$: '$' would accept a trailing newline.
        if not SEGMENT_PATTERN.fullmatch(segment):
            raise InvalidNameError(
                f"invalid store key {_shown(key)}: segment {_shown(segment)} must be 1-128 "
                "characters of A-Z, a-z, 0-9, '.', '_' and '-', starting with a letter or "
                "digit (no empty segments, no leading or trailing '/')",
                param="key",
            )
    return key


def validate_prefix(prefix: object) -> str:
    """Return the normalised prefix: ``""`` or a valid key followed by ``/``."""
    if not isinstance(prefix, str):
        raise InvalidNameError(
            f"store prefix must be a string, got {type(prefix).__name__}", param="prefix"
        )
    if prefix == "":
        return ""
    stem = prefix[:-1] if prefix.endswith("/") else prefix
    try:
        validate_key(stem)
    except InvalidNameError as exc:
        raise InvalidNameError(
            f"invalid store prefix {_shown(prefix)}: {exc.message}", param="prefix"
        ) from None
    return stem + "/"


def _check_size(key: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise ArtifactError(
            f"object {key!r} is {size} bytes, over the limit of {max_bytes} bytes", param="key"
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
            _check_size(key, st.st_size, max_bytes)
            # Read at most limit+1 bytes: a file growing after fstat still cannot blow memory.
            data = f.read() if max_bytes is None else f.read(max_bytes + 1)
        _check_size(key, len(data), max_bytes)
        if sha256 is not None:
            actual = hashlib.sha256(data).hexdigest()
            if actual != sha256.lower():
                raise ChecksumMismatchError(
                    f"object {key!r} is corrupt: expected sha256 {sha256}, got {actual}",
                    param="key",
                )
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
        prefix = validate_prefix(prefix)
        top = self._path(prefix.rstrip("/")) if prefix else self.root
        if not top.is_dir():
            return []
        keys: builtins.list[str] = []
        for dirpath, dirnames, filenames in os.walk(top):
            # Never descend into names that cannot be part of a key (temp or hidden dirs).
            dirnames[:] = [d for d in dirnames if SEGMENT_PATTERN.fullmatch(d)]
            rel = Path(dirpath).relative_to(self.root).as_posix()
            for name in filenames:
                if not SEGMENT_PATTERN.fullmatch(name):
                    continue  # .tmp-* leftovers and stray files are not keys
                key = name if rel == "." else f"{rel}/{name}"
                path = Path(dirpath, name)
                # Symlinks are never written by put; skipping them keeps list inside root.
                if len(key) <= MAX_KEY_LENGTH and not path.is_symlink() and path.is_file():
                    keys.append(key)
        keys.sort()
        return keys


def open_store(url: str) -> AdapterStore:
    """Open the store named by ``url``: ``file:///abs/path`` or a plain path; S3 later."""
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
        raise NotImplementedError(
            f"cannot open {url!r}: S3 store arrives with the scale-out issue; "
            "use a local path or file:/// url for now"
        )
    if scheme and len(scheme) > 1:  # a one-letter 'scheme' is a Windows drive letter
        raise ValueError(f"unsupported store url scheme {scheme!r} in {url!r}")
    return LocalStore(url)
