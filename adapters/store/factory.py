"""``open_store(url)``: the store a url names, ``LocalStore`` or ``S3Store``.

``file:///abs/path`` or a plain path opens a ``LocalStore``; ``s3://...`` (see
``adapters.store.s3_url.parse_s3_url``) an ``S3Store``. boto3 is imported only when an
``s3://`` url is opened, so a deployment without S3 never loads it. Anything else is a
``ValueError``.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from adapters.store.local import LocalStore
from adapters.store.protocol import AdapterStore
from adapters.store.s3_url import parse_s3_url


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
        from adapters.store.s3 import S3Store  # boto3 is imported only by those who use S3

        return S3Store(parse_s3_url(url))
    if scheme and len(scheme) > 1:  # a one-letter 'scheme' is a Windows drive letter
        raise ValueError(f"unsupported store url scheme {scheme!r} in {url!r}")
    return LocalStore(url)
