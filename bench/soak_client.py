"""A small keep-alive HTTP/1.1 client on asyncio streams for the soak benchmark.

Like ``bench.http.RawConnection`` (a general-purpose client costs ~13 ms of CPU per request,
enough to make a 2-core load generator the bottleneck), but it survives what the soak does to
the server: a worker SIGKILLed mid-request (the connection resets: ``TransportError``), bodies
the server refuses before reading them (413), raw bytes that are not JSON, and per-request
``Connection: close`` so new connections spread over the serving workers.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass


class TransportError(Exception):
    """The connection failed or closed before a whole response arrived (no HTTP status)."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    worker: str  # the X-Tailor-Worker header: the pid of the serving worker that answered


IDLE_REOPEN_S = 2.0  # the server closes idle keep-alive connections (uvicorn: after 5 s)


class Connection:
    """One connection, reopened on the next request after any failure, after ``close``, and
    when it sat idle long enough for the server to have closed it (as HTTP clients do)."""

    def __init__(self, host: str, port: int, timeout: float = 30.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._last_used = 0.0

    async def request(self, method: str, path: str, body: bytes = b"", *, key: str | None = None,
                      close: bool = False, content_type: str = "application/json",
                      expect_continue: bool = False) -> Reply:
        """Send one request and read its response; ``TransportError`` when there is none.

        ``expect_continue``: send the headers with ``Expect: 100-continue`` and the body only
        once the server says ``100 Continue`` (it may answer at once instead, e.g. 413 by
        Content-Length, as a large upload's client would hope)."""
        try:
            return await asyncio.wait_for(self._request(method, path, body, key, close, content_type,
                                                        expect_continue), self.timeout)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, ValueError, IndexError) as e:
            await self.close()
            raise TransportError(f"{type(e).__name__}: {e}") from None

    async def _request(self, method: str, path: str, body: bytes, key: str | None, close: bool,
                       content_type: str, expect_continue: bool) -> Reply:
        loop = asyncio.get_running_loop()
        if self._writer is not None and loop.time() - self._last_used > IDLE_REOPEN_S:
            await self.close()
        if self._writer is None:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        reader, writer = self._reader, self._writer
        assert reader is not None
        head = [f"{method} {path} HTTP/1.1", f"Host: {self.host}", f"Content-Length: {len(body)}"]
        if key is not None:
            head.append(f"Authorization: Bearer {key}")
        if body:
            head.append(f"Content-Type: {content_type}")
        if close:
            head.append("Connection: close")
        if expect_continue:
            head.append("Expect: 100-continue")
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (b"" if expect_continue else body))
        await writer.drain()
        status = await _status(reader)
        if expect_continue and status == 100:
            while (await reader.readline()) not in (b"\r\n", b""):
                pass
            writer.write(body)
            await writer.drain()
            status = await _status(reader)
        length, chunked, closing, worker = 0, False, close, ""
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and value.lower() == b"chunked":
                chunked = True
            elif name == b"connection" and value.lower() == b"close":
                closing = True
            elif name == b"x-tailor-worker":
                worker = value.decode()
        data = await _read_chunked(reader) if chunked else await reader.readexactly(length)
        self._last_used = loop.time()
        if closing:
            await self.close()
        return Reply(status, data, worker)

    async def close(self) -> None:
        writer, self._writer, self._reader = self._writer, None, None
        if writer is not None:
            writer.close()
            try:
                await writer.wait_closed()
            except (OSError, asyncio.CancelledError):
                pass


async def _status(reader: asyncio.StreamReader) -> int:
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionResetError("connection closed before a response")
    return int(status_line.split()[1])


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts = []
    while True:
        size = int((await reader.readline()).split(b";")[0].strip(), 16)
        if size == 0:
            await reader.readline()
            return b"".join(parts)
        parts.append(await reader.readexactly(size))
        await reader.readline()
