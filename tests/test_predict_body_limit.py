"""Where images are served a predict body may be large (``max_predict_bytes``: room for base64
images), but a body of texts never past ``max_body_bytes``: it is refused with a 413 naming that
limit while it is being read, before the rest arrives (``service.predict_input``). Against a real
``bentoml serve .`` with a small text limit (64 KiB) beside a larger image one."""

from __future__ import annotations

import base64
import json
import os
import socket
from collections.abc import Iterator

import httpx
import pytest

from service.settings import Settings
from tests.service_fixture import LIMITS, Served, save_tiny_base, serving

TEXT_LIMIT = 64 * 1024
# images of up to 3 MiB: a predict body may reach ~16 MiB, more than the kernel buffers a refused
# body's sender can park on loopback (see the whole-body test)
OVERRIDES = {"TAILOR_MAX_BODY_BYTES": str(TEXT_LIMIT), "TAILOR_MAX_IMAGE_BYTES": str(3 << 20)}


def image_limit() -> int:
    """The served process's ``max_predict_bytes``, from the same settings it reads."""
    return Settings.from_env({**LIMITS, **OVERRIDES}, admin_key=False).max_predict_bytes


@pytest.fixture(scope="module")
def limited(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, str]]:
    root = tmp_path_factory.mktemp("predict-body-limit")
    with serving(root / "home", save_tiny_base(root / "model"), OVERRIDES) as s:
        with s.client(s.admin_key) as admin:
            r = admin.post("/v1/tenants", json={"name": "bodies"})
            assert r.status_code == 201, r.text
        yield s, r.json()["api_key"]


def test_the_limits_differ() -> None:
    assert image_limit() > 3 * TEXT_LIMIT


def test_texts_past_the_text_limit_are_413_naming_it(limited: tuple[Served, str]) -> None:
    s, key = limited
    with s.client(key) as c:
        small = c.post("/v1/predict", json={"adapter": "none", "inputs": ["z" * 1000]})
        assert small.status_code == 404, small.text  # read, parsed, then no such adapter
        big = {"adapter": "none", "inputs": ["z" * 1500] * 60}  # ~90 KB: under the image limit, over the text one
        r = c.post("/v1/predict", content=json.dumps(big).encode(), headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        err = r.json()["error"]
        assert err["code"] == "payload_too_large" and err["param"] == "inputs"
        assert f"{TEXT_LIMIT} byte limit" in err["message"] and str(image_limit()) in err["message"]


def raw_predict(s: Served, key: str, sent: bytes, content_length: int) -> bytes:
    """Send a predict's headers declaring ``content_length`` and then ``sent`` (all of the body, or
    only its start) on a plain socket; the answer's status line and headers."""
    host, port = s.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        sock.sendall(f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {content_length}\r\n\r\n".encode() + sent)
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"connection closed without an answer: {answer!r}"
            answer += chunk
    return answer


def test_the_refusal_comes_before_the_rest_of_the_body(limited: tuple[Served, str]) -> None:
    """Half of a declared body past the text limit is sent, the rest never: the 413 still comes."""
    s, key = limited
    head = b'{"adapter": "none", "inputs": ["' + b"z" * (TEXT_LIMIT + 1000)
    answer = raw_predict(s, key, head, 2 * len(head))
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line.split()[1] == b"413", answer[:500]
    assert b"connection: close" in rest.lower()


def test_a_client_sending_its_whole_body_at_once_still_reads_the_413(limited: tuple[Served, str]) -> None:
    """The refused body's rest is read and dropped before the answer (for up to LINGER_S): a
    connection closed with the client's bytes unread is reset, and a client still sending would
    get that reset instead of its 413."""
    s, key = limited
    body = b'{"adapter": "none", "inputs": ["' + b"z" * (11 << 20) + b'"]}'  # as the soak's oversize body
    assert TEXT_LIMIT < len(body) < image_limit()
    for _ in range(5):
        answer = raw_predict(s, key, body, len(body))
        assert answer.split(b"\r\n", 1)[0].split()[1] == b"413", answer[:500]


def test_images_may_use_the_image_limit(limited: tuple[Served, str]) -> None:
    s, key = limited
    images = [base64.b64encode(os.urandom(40_000)).decode() for _ in range(3)]  # ~160 KB of base64
    body = json.dumps({"adapter": "none", "images": images}).encode()
    assert TEXT_LIMIT < len(body) < image_limit()
    with s.client(key) as c:
        r = c.post("/v1/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 404, r.text  # read in full and parsed: only the adapter is missing
    assert r.json()["error"]["param"] == "adapter"


def test_past_the_image_limit_is_413_too(limited: tuple[Served, str]) -> None:
    s, key = limited

    def chunks() -> Iterator[bytes]:  # no Content-Length: refused while streaming
        yield b'{"adapter": "none", "images": ["'
        for _ in range(image_limit() // 50_000 + 2):
            yield b"A" * 50_000

    with s.client(key) as c:
        r = c.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413, r.text
    assert f"{image_limit()} byte limit" in r.json()["error"]["message"]
    with httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {key}"}) as c:  # and all is well
        assert c.post("/v1/predict", json={"adapter": "none", "inputs": ["ok"]}).status_code == 404
