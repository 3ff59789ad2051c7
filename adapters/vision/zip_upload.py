"""Reading an untrusted zip upload in memory: names checked before use, sizes counted as read.

Contract:

* Nothing is ever extracted or written: members are read from the in-memory archive into
  bytes, so no member name ever reaches a path.
* ``ZipUpload(data, limits)`` refuses, by raising ``ZipProblem``: an unreadable archive, more
  than ``max_members`` entries (directories included), and then, in the archive's order, the
  first entry whose name is unsafe (absolute, drive letter, backslash, ``..``, ``.`` or empty
  segment, control character), that is a symbolic link or other special file, is encrypted,
  or repeats an earlier name. ``files`` are the remaining regular files in archive order,
  without directories and without the junk desktop tools add (``__MACOSX/``, hidden dot
  files, ``Thumbs.db``, ``desktop.ini``).
* ``declared_bytes()`` sums what the headers claim (cheap, checked first by callers); ``read``
  trusts no header: it decompresses at most ``max_member_bytes`` (and what is left of
  ``max_total_bytes``) plus one byte, counting what it gets, and refuses past either limit; a
  bad CRC, a corrupt stream or an unknown compression method are refused too.
* ``ZipProblem.member`` is the entry's name (``None`` for the whole archive) and ``.problem``
  reads after it: "escapes the archive ('..' in its path)".
"""

from __future__ import annotations

import io
import re
import stat
import zipfile
import zlib
from dataclasses import dataclass
from types import TracebackType

_SKIPPED_FILES = frozenset({"thumbs.db", "desktop.ini"})
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ZipProblem(Exception):
    def __init__(self, member: str | None, problem: str) -> None:
        super().__init__(f"{member} {problem}" if member is not None else problem)
        self.member = member
        self.problem = problem


@dataclass(frozen=True)
class ZipLimits:
    max_members: int
    max_member_bytes: int
    max_total_bytes: int

    def __post_init__(self) -> None:
        for name in ("max_members", "max_member_bytes", "max_total_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ZipLimits.{name} must be a positive integer, got {value!r}")


class ZipUpload:
    """An open, name-checked archive; use as a context manager (or call ``close``)."""

    def __init__(self, data: bytes, limits: ZipLimits) -> None:
        self.limits = limits
        self.total_read = 0
        try:
            self._archive = zipfile.ZipFile(io.BytesIO(data))
        except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as error:
            raise ZipProblem(None, f"is not a readable zip file ({error})") from None
        try:
            self.files = self._checked_files()
        except BaseException:
            self._archive.close()
            raise

    def _checked_files(self) -> tuple[zipfile.ZipInfo, ...]:
        infos = self._archive.infolist()
        if len(infos) > self.limits.max_members:
            raise ZipProblem(
                None, f"has {len(infos):,} zip entries; the limit is {self.limits.max_members:,}")
        names: set[str] = set()
        files = []
        for info in infos:
            problem = member_problem(info)
            if problem is None and info.filename in names:
                problem = "appears twice in the zip"
            if problem:
                raise ZipProblem(info.filename, problem)
            names.add(info.filename)
            if not info.is_dir() and not is_junk(info.filename):
                files.append(info)
        return tuple(files)

    def declared_bytes(self) -> int:
        """The uncompressed size of ``files`` as their headers claim it (may be a lie)."""
        return sum(info.file_size for info in self.files)

    def read(self, info: zipfile.ZipInfo) -> bytes:
        """One member's bytes, counted against both limits as they decompress, CRC checked."""
        left = self.limits.max_total_bytes - self.total_read
        limit = min(self.limits.max_member_bytes, left)
        if info.file_size > self.limits.max_member_bytes:
            raise ZipProblem(info.filename, f"is {info.file_size:,} bytes; the limit is "
                                            f"{self.limits.max_member_bytes:,} bytes per file")
        try:
            with self._archive.open(info) as member:
                content = member.read(limit + 1)
        except NotImplementedError as error:
            raise ZipProblem(info.filename, f"uses a compression method we cannot read ({error})") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, RuntimeError) as error:
            raise ZipProblem(info.filename, f"is corrupt in the zip ({error})") from None
        if len(content) > limit:
            which = ("the limit per file" if limit == self.limits.max_member_bytes
                     else "what is left of the limit for the whole zip")
            raise ZipProblem(info.filename, f"unpacks to more than {limit:,} bytes ({which}; its "
                                            f"header declares {info.file_size:,})")
        self.total_read += len(content)
        return content

    def close(self) -> None:
        self._archive.close()

    def __enter__(self) -> ZipUpload:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def member_problem(info: zipfile.ZipInfo) -> str | None:
    """What makes one entry unsafe to use, or None."""
    name = info.filename
    if "\\" in name:
        return "has a backslash in its path; zip paths use '/'"
    if name.startswith("/") or _DRIVE.match(name):
        return "is an absolute path; members must be relative"
    if _CONTROL.search(name):
        return "has a control character in its path"
    segments = name.removesuffix("/").split("/")
    if ".." in segments:
        return "escapes the archive ('..' in its path)"
    if "" in segments or "." in segments:
        return "has an empty or '.' segment in its path"
    if info.flag_bits & 0x1:
        return "is encrypted; upload an unencrypted zip"
    kind = stat.S_IFMT(info.external_attr >> 16)
    if info.create_system == 3 and kind:  # Unix file type bits (often absent: a plain file)
        if kind == stat.S_IFLNK:
            return "is a symbolic link; only regular files and folders are allowed"
        if kind not in (stat.S_IFREG, stat.S_IFDIR):
            return "is not a regular file or folder"
    return None


def is_junk(name: str) -> bool:
    """Files desktop zip tools add that are never data: skipped, not refused."""
    segments = name.split("/")
    return (segments[0] == "__MACOSX" or any(s.startswith(".") for s in segments)
            or segments[-1].lower() in _SKIPPED_FILES)
