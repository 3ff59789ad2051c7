"""The ``s3://`` store url grammar: ``parse_s3_url`` turns a url into an ``S3Location``.

``s3://bucket[/prefix][?endpoint_url=..&region=..&create_bucket=1&...]`` names one bucket
(``validate_bucket``: the portable subset of S3's naming rules that MinIO and Ceph also
accept) and an optional key prefix (the store key grammar of ``adapters.names``). A url never
carries credentials: those come from the AWS environment. Parsing is pure (no network, no
boto3), so settings can check a url at start without opening the store; ``S3Location.url()``
gives the canonical url back.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlencode, urlsplit

from adapters.errors import InvalidNameError
from adapters.names import validate_prefix


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


