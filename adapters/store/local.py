"""``LocalStore``: the adapter store on a local (or mounted) directory.

Contract: the one of ``adapters.store.protocol.AdapterStore``, on a file system.

``LocalStore`` keeps one file per key under a root directory. Writes go to a ``.tmp-*``
file in the target directory, are fsynced, renamed over the final name and the directory is
fsynced. ``.tmp-*`` names can never be keys (segments start with a letter or digit), so
leftovers from a crash are invisible to ``list``/``get``; ``cleanup_temp`` removes them.
Keys are file names, not directories: ``a/b`` and ``a/b/c`` cannot both exist
(``ConflictError``). A key that resolves outside the root (a symlink) is refused, and symlinks
are never listed. Nothing here imports boto3.
"""

from __future__ import annotations

import builtins
import hashlib
import os
import stat
import tempfile
import time
from pathlib import Path

from adapters.errors import ConflictError, InvalidNameError, NotFoundError
from adapters.names import MAX_KEY_LENGTH, SEGMENT_PATTERN, validate_key, validate_prefix
from adapters.store.protocol import StoreEntry, check_size, verify_sha256

TEMP_PREFIX = ".tmp-"


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


