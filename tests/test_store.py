"""The store contract, on LocalStore and on S3Store (moto): atomic puts, verified gets, key
validation before any disk access or request. Tests named ``*_local_*`` are LocalStore's own
(directories, symlinks, sparse files); every other test runs on both backends."""

from __future__ import annotations

import ast
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import adapters.store
from adapters.errors import (
    ArtifactError,
    ChecksumMismatchError,
    ConflictError,
    InvalidNameError,
    NotFoundError,
)
from adapters.store import AdapterStore, LocalStore, open_store, validate_key, validate_prefix
from tests.s3 import moto_endpoint, s3_env, s3_url  # noqa: F401 - fixtures


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[AdapterStore]:
    """A fresh, empty store: a directory, or a fresh prefix of one moto bucket."""
    if request.param == "local":
        yield LocalStore(tmp_path / "blobs")
        return
    endpoint = request.getfixturevalue("s3_env")
    s3 = open_store(s3_url(endpoint))
    yield s3
    s3.close()  # type: ignore[attr-defined]


@pytest.fixture
def local_store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "blobs")


def files_under(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def physical(store: AdapterStore) -> list[str]:
    """Everything the backend holds for this store, temp files and objects included."""
    if isinstance(store, LocalStore):
        return [n for n in files_under(store.root) if (store.root / n).is_file()]
    pages = store._client.get_paginator("list_objects_v2").paginate(  # type: ignore[attr-defined]
        Bucket=store.bucket, Prefix=store.prefix)  # type: ignore[attr-defined]
    return sorted(o["Key"][len(store.prefix):] for p in pages for o in p.get("Contents", []))  # type: ignore[attr-defined]


def overwrite_behind_its_back(store: AdapterStore, key: str, data: bytes) -> None:
    """Change an object without going through put (a person, a script, bit rot)."""
    if isinstance(store, LocalStore):
        (store.root / key).write_bytes(data)
    else:
        store._client.put_object(Bucket=store.bucket, Key=store.prefix + key, Body=data)  # type: ignore[attr-defined]


def count_requests(store: AdapterStore) -> list[str]:
    """The S3 requests ``store`` sends from now on (an empty list forever for LocalStore)."""
    sent: list[str] = []
    if not isinstance(store, LocalStore):
        store._client.meta.events.register(  # type: ignore[attr-defined]
            "before-send.s3", lambda request, **_: sent.append(f"{request.method} {request.url}"))
    return sent


def test_put_get_round_trip(store: AdapterStore) -> None:
    data = b"\x00weights\xff" * 1000
    digest = store.put("t1/sentiment/v1/adapter.safetensors", data)
    assert digest == hashlib.sha256(data).hexdigest()
    assert store.get("t1/sentiment/v1/adapter.safetensors") == data
    assert store.get("t1/sentiment/v1/adapter.safetensors", sha256=digest) == data
    assert store.get("t1/sentiment/v1/adapter.safetensors", sha256=digest.upper()) == data
    assert store.exists("t1/sentiment/v1/adapter.safetensors")
    assert store.size("t1/sentiment/v1/adapter.safetensors") == len(data)
    assert isinstance(store, AdapterStore)


def test_put_overwrites_whole_object(store: AdapterStore) -> None:
    store.put("k", b"a much longer first value")
    store.put("k", b"short")
    assert store.get("k") == b"short"
    assert physical(store) == ["k"]  # no temp file left behind


def test_readers_never_see_a_partial_object(store: AdapterStore) -> None:
    # One writer alternates two large values; every read returns exactly one of them.
    values = [bytes([i]) * (512 << 10) for i in (1, 2)]
    store.put("k", values[0])
    seen: list[bytes] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            seen.append(store.get("k"))

    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(8):
            store.put("k", values[i % 2])
            assert store.list() == ["k"]  # temp objects are never listed
    finally:
        stop.set()
        reader.join()
    assert seen and all(v in values for v in seen)
    assert physical(store) == ["k"]


def test_empty_object(store: AdapterStore) -> None:
    assert store.put("empty", b"") == hashlib.sha256(b"").hexdigest()
    assert store.get("empty", max_bytes=0) == b""


def test_missing_key(store: AdapterStore) -> None:
    with pytest.raises(NotFoundError, match="'nope/x'"):
        store.get("nope/x")
    with pytest.raises(NotFoundError):
        store.size("nope/x")
    assert not store.exists("nope/x")


def test_directory_is_not_an_object(store: AdapterStore) -> None:
    store.put("a/b/c", b"x")
    assert not store.exists("a/b")
    with pytest.raises(NotFoundError):
        store.get("a/b")
    assert store.list("a/b") == ["a/b/c"]


def test_local_directory_and_object_conflict(local_store: LocalStore) -> None:
    store = local_store
    store.put("a/b/c", b"x")
    assert not store.exists("a/b")
    with pytest.raises(NotFoundError):
        store.get("a/b")
    with pytest.raises(ConflictError):
        store.put("a/b", b"y")  # would replace a directory holding objects
    with pytest.raises(ConflictError):
        store.put("a/b/c/d", b"y")  # a parent is an object
    assert store.get("a/b/c") == b"x"


def test_local_crash_leftover_temp_is_invisible_and_cleaned(local_store: LocalStore) -> None:
    store = local_store
    store.put("t1/a/v1/w", b"complete")
    # A writer that died before its rename leaves a partial temp file next to the target.
    leftover = store.root / "t1" / "a" / "v1" / ".tmp-dead1234"
    leftover.write_bytes(b"parti")
    (store.root / ".tmp-top").write_bytes(b"x")
    (store.root / ".tmp-dir").mkdir()
    (store.root / ".tmp-dir" / "inner").write_bytes(b"x")

    assert store.list() == ["t1/a/v1/w"]
    assert store.list("t1/a/v1") == ["t1/a/v1/w"]
    with pytest.raises(InvalidNameError):
        store.get("t1/a/v1/.tmp-dead1234")  # not even a valid key

    # Fresh temp files may belong to a live writer: kept.
    assert store.cleanup_temp(older_than_s=3600) == 0
    assert leftover.exists()
    old = time.time() - 7200
    for p in (leftover, store.root / ".tmp-top", store.root / ".tmp-dir" / "inner"):
        os.utime(p, (old, old))
    assert store.cleanup_temp(older_than_s=3600) == 2  # only .tmp-* files are temp files
    assert not leftover.exists() and not (store.root / ".tmp-top").exists()
    assert store.get("t1/a/v1/w") == b"complete"


def test_put_of_non_bytes_writes_nothing(store: AdapterStore) -> None:
    sent = count_requests(store)
    for bad in ("not bytes", None, 3, [b"x"]):
        with pytest.raises(TypeError):
            store.put("k", bad)  # type: ignore[arg-type]
    assert sent == [] and physical(store) == []
    store.put("k", bytearray(b"ba"))
    store.put("m", memoryview(b"mv"))
    assert store.get("k") == b"ba" and store.get("m") == b"mv"


def test_local_put_failure_leaves_no_partial_file(local_store: LocalStore) -> None:
    store = local_store
    store.put("k", b"old")
    # Make the rename itself fail (the target is a directory): the temp file must go.
    store.put("d/x", b"1")
    with pytest.raises(ConflictError):
        store.put("d", b"new")
    assert files_under(store.root) == ["d", "d/x", "k"]
    assert store.get("k") == b"old"


def test_checksum_mismatch_after_tampering(store: AdapterStore, caplog: pytest.LogCaptureFixture) -> None:
    digest = store.put("t1/a/v1/w", b"original bytes")
    overwrite_behind_its_back(store, "t1/a/v1/w", b"original bytez")
    actual = hashlib.sha256(b"original bytez").hexdigest()
    with caplog.at_level("WARNING", logger="tailor.store"):
        with pytest.raises(ChecksumMismatchError) as info:
            store.get("t1/a/v1/w", sha256=digest)
    msg = str(info.value)
    assert "t1/a/v1/w" in msg and digest in msg and actual in msg
    assert info.value.code == "checksum_mismatch"
    assert any("checksum mismatch" in r.getMessage() and "t1/a/v1/w" in r.getMessage() for r in caplog.records)
    assert store.get("t1/a/v1/w") == b"original bytez"  # without sha256: no record to check against


def test_max_bytes_refused_before_reading(store: AdapterStore) -> None:
    store.put("big", b"x" * 1000)
    assert store.get("big", max_bytes=1000) == b"x" * 1000
    with pytest.raises(ArtifactError) as info:
        store.get("big", max_bytes=999)
    msg = str(info.value)
    assert "big" in msg and "1000" in msg and "999" in msg
    assert not isinstance(info.value, ChecksumMismatchError)


def test_local_max_bytes_checked_on_size_not_content(local_store: LocalStore) -> None:
    store = local_store
    # A sparse 1 GiB file: refused from its size alone, so reading it never happens.
    path = store.root / "huge"
    with open(path, "wb") as f:
        f.truncate(1 << 30)
    t0 = time.perf_counter()
    with pytest.raises(ArtifactError, match=str(1 << 30)):
        store.get("huge", max_bytes=1 << 20)
    assert time.perf_counter() - t0 < 0.5


BAD_KEYS = [
    "",
    "../x",
    "a/../b",
    "a/./b",
    "..",
    ".",
    "a//b",
    "/abs",
    "abs/",
    "a/b/",
    "ａ",  # fullwidth a
    "tenant/ａdapter",
    "é",
    "a\x00b",
    "a\nb",
    "a\n",
    "a b",
    "a\\b",
    ".hidden",
    ".tmp-123",
    "-dash",
    "x" * 129,
    "/".join(["a" * 100] * 6),  # 605 chars, valid segments
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_rejected_before_any_request(store: AdapterStore, key: str) -> None:
    sent = count_requests(store)
    with pytest.raises(InvalidNameError):
        validate_key(key)
    for call in (
        lambda: store.put(key, b"data"),
        lambda: store.get(key),
        lambda: store.get(key, sha256="0" * 64),
        lambda: store.delete(key),
        lambda: store.exists(key),
        lambda: store.size(key),
    ):
        with pytest.raises(InvalidNameError):
            call()
    for prefix in ("..", "../", "a//", "/a", ".tmp", "a/.tmp/"):
        with pytest.raises(InvalidNameError):
            store.list(prefix)
        with pytest.raises(InvalidNameError):
            store.delete_prefix(prefix)
    assert sent == [] and physical(store) == []


@pytest.mark.parametrize("key", BAD_KEYS)
def test_local_bad_keys_rejected_before_touching_disk(tmp_path: Path, key: str) -> None:
    root = tmp_path / "blobs"
    store = LocalStore(root)
    (tmp_path / "x").write_bytes(b"outside")  # what '../x' would reach
    before = files_under(tmp_path)
    with pytest.raises(InvalidNameError):
        validate_key(key)
    for call in (
        lambda: store.put(key, b"data"),
        lambda: store.get(key),
        lambda: store.delete(key),
        lambda: store.exists(key),
        lambda: store.size(key),
    ):
        with pytest.raises(InvalidNameError):
            call()
    assert files_under(tmp_path) == before
    assert (tmp_path / "x").read_bytes() == b"outside"


def test_non_string_key_rejected(store: AdapterStore) -> None:
    with pytest.raises(InvalidNameError):
        store.get(b"abc")  # type: ignore[arg-type]
    with pytest.raises(InvalidNameError):
        validate_key(None)


def test_good_keys_accepted() -> None:
    for key in ["a", "A.b_c-d", "t1/sentiment/v12/adapter.safetensors", "x" * 128, "/".join(["a" * 127] * 4)]:
        assert validate_key(key) == key
    assert len("/".join(["a" * 127] * 4)) == 511


def test_prefixes() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("t1") == "t1/"
    assert validate_prefix("t1/a/") == "t1/a/"
    for bad in ["/", "//", "t1//", "../", "/t1", "a/../", "ａ/"]:
        with pytest.raises(InvalidNameError):
            validate_prefix(bad)


def test_local_symlink_escape_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    store = LocalStore(tmp_path / "blobs")
    (store.root / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(InvalidNameError, match="outside"):
        store.get("evil/secret")
    with pytest.raises(InvalidNameError):
        store.put("evil/new", b"x")
    assert not (outside / "new").exists()
    assert store.list() == []


def test_delete_is_idempotent(store: AdapterStore) -> None:
    store.put("t1/a/v1/w", b"x")
    store.delete("t1/a/v1/w")
    assert not store.exists("t1/a/v1/w")
    store.delete("t1/a/v1/w")
    store.delete("never/existed")
    store.delete("t1/a")  # a directory, not an object: nothing happens
    with pytest.raises(NotFoundError):
        store.get("t1/a/v1/w")


def test_list_sorted_and_prefix_scoped(store: AdapterStore) -> None:
    keys = ["t1/b/v1/w", "t1/a/v2/w", "t1/a/v1/w", "t1/a/v1/m", "t1/ab/v1/w", "t2/a/v1/w", "top"]
    for k in reversed(keys):
        store.put(k, k.encode())
    assert store.list() == sorted(keys)
    assert store.list("t1/a") == ["t1/a/v1/m", "t1/a/v1/w", "t1/a/v2/w"]  # not t1/ab
    assert store.list("t1/a/") == store.list("t1/a")
    assert store.list("t1") == sorted(k for k in keys if k.startswith("t1/"))
    assert store.list("t3") == []
    assert store.list("top") == []  # an object is not a directory


def test_entries_give_size_and_modified_time(store: AdapterStore) -> None:
    before = time.time()
    for k, data in (("t1/b/w", b"12345"), ("t1/a/w", b""), ("t2/x", b"x" * 70)):
        store.put(k, data)
    after = time.time()
    entries = store.entries("t1")
    assert [(e.key, e.size) for e in entries] == [("t1/a/w", 0), ("t1/b/w", 5)]
    # S3 keeps whole seconds: allow for that and a little clock difference from the server
    assert all(before - 5 <= e.modified <= after + 5 for e in entries), (before, entries, after)
    assert [e.key for e in store.entries()] == store.list() == ["t1/a/w", "t1/b/w", "t2/x"]
    assert store.entries("t3") == []


def test_delete_prefix(store: AdapterStore) -> None:
    for k in ["t1/a/v1/w", "t1/a/v2/w", "t1/ab/v1/w", "t2/a/v1/w"]:
        store.put(k, b"x")
    assert store.delete_prefix("t1/a") == 2
    assert store.list() == ["t1/ab/v1/w", "t2/a/v1/w"]
    assert physical(store) == ["t1/ab/v1/w", "t2/a/v1/w"]
    if isinstance(store, LocalStore):
        assert not (store.root / "t1" / "a").exists()  # empty directories pruned
    assert store.delete_prefix("t1/a") == 0
    store.put("t1/a/v3/w", b"y")  # the pruned path can be used again
    assert store.list("t1/a") == ["t1/a/v3/w"]
    with pytest.raises(InvalidNameError):
        store.delete_prefix("")
    with pytest.raises(InvalidNameError):
        store.delete_prefix("../")


def test_open_store(tmp_path: Path) -> None:
    a = open_store(str(tmp_path / "s1"))
    assert isinstance(a, LocalStore)
    assert a.url == (tmp_path / "s1").resolve().as_uri()
    b = open_store(a.url)
    assert isinstance(b, LocalStore) and b.root == a.root
    a.put("k", b"shared")
    assert b.get("k") == b"shared"
    spaced = open_store((tmp_path / "with space").as_uri())
    assert isinstance(spaced, LocalStore) and spaced.root.name == "with space"
    with pytest.raises(ValueError, match="bucket"):
        open_store("s3://Bad_Bucket/prefix")
    with pytest.raises(ValueError):
        open_store("ftp://host/x")
    with pytest.raises(ValueError):
        open_store("file://otherhost/x")


# -- the package: submodules import each other directly, only the S3 ones load boto3 ---------

STORE_DIR = Path(adapters.store.__file__).parent
STORE_MODULES = sorted(p.stem for p in STORE_DIR.glob("*.py") if p.stem != "__init__")


def fresh_python(code: str) -> str:
    """Run ``code`` in a new interpreter at the repository root; its stdout."""
    done = subprocess.run([sys.executable, "-c", code], cwd=STORE_DIR.parents[1], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("module", STORE_MODULES)
def test_each_store_module_imports_alone(module: str) -> None:
    loaded = fresh_python(f"import sys, adapters.store.{module}; print('boto3' in sys.modules)")
    assert loaded == str(module in ("s3", "s3_client"))


def test_store_modules_never_import_their_package() -> None:
    assert {"protocol", "local", "s3_url", "s3_client", "s3", "factory"} <= set(STORE_MODULES)
    for path in STORE_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) else (
                [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            assert "adapters.store" not in names, f"{path.name} imports the package, not a module"


def test_a_local_store_never_loads_boto3(tmp_path: Path) -> None:
    code = (f"import sys; from adapters.store import open_store; s = open_store({str(tmp_path)!r}); "
            "s.put('k', b'v'); print(type(s).__name__, 'boto3' in sys.modules)")
    assert fresh_python(code) == "LocalStore False"
