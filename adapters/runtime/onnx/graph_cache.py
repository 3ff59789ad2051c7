"""Exported graphs on disk, shared by every worker and replica that sees the same directory.

Contract:

* A graph is keyed by ``GraphKey``: the base fingerprint, the precision (``fp32``/``int8``),
  the opset, the graph layout version, the exporter's versions (torch, onnx, onnxruntime) and
  its target set (``targets``: ``"*"`` for the graph with a LoRA branch on every adaptable
  layer, else the sorted module paths it adapts, ``targets_value``) and, for int8, the
  quantisation recipe's key (``Int8Recipe.key``: a graph quantised another way is not reused;
  empty for fp32, which leaves an fp32 graph's digest as it was before the field existed).
  Its file is ``<dir>/<digest>.onnx`` with a sidecar ``<digest>.json`` holding the key and the
  graph's sha256. Both are written atomically (temporary file, fsync, rename; the sidecar
  last), so a reader sees a whole graph or none.
* ``GraphCache.get(key, build)`` returns the graph's bytes: from disk when the sidecar names
  this key and the bytes match its checksum; otherwise (absent, another base's, corrupt) it
  logs why, calls ``build()`` and stores the result. Builders of one key are serialised by an
  advisory file lock, so workers starting together export once and the rest read the file.
* The graph carries its base fingerprint, precision and target set in its own metadata
  (``FINGERPRINT_PROP``, ``PRECISION_PROP``, ``TARGETS_PROP``); ``load`` refuses (and ``get``
  rebuilds) one whose metadata names another base, precision or target set, whatever the
  sidecar says, and the serving layer checks the session's metadata again (``check_graph_base``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from adapters.runtime.onnx.quantize import Int8Recipe

log = logging.getLogger("tailor.onnx")

LAYOUT_VERSION = 3  # bump when the graph's inputs, outputs or post-export rewrites change (2: no NaN guards; 3: layers_mean)
FINGERPRINT_PROP = "tailor.base_fingerprint"
PRECISION_PROP = "tailor.precision"
TARGETS_PROP = "tailor.targets"
PRECISIONS = ("fp32", "int8")
ALL_TARGETS = "*"


def targets_value(targets: frozenset[str] | None) -> str:
    """A target set as the key and the graph's metadata spell it (None: every adaptable layer)."""
    return ALL_TARGETS if targets is None else ",".join(sorted(targets))


def parse_targets(value: str | None) -> frozenset[str] | None:
    """``targets_value``'s inverse (a graph without the property adapts every layer)."""
    if value is None or value == ALL_TARGETS:
        return None
    return frozenset(v for v in value.split(",") if v)


class GraphMismatchError(ValueError):
    """A graph that is not for this base (or this precision)."""


@dataclass(frozen=True)
class GraphKey:
    fingerprint: str
    precision: str
    opset: int
    layout: int
    torch: str
    onnx: str
    onnxruntime: str
    targets: str = ALL_TARGETS
    quantization: str = ""

    @classmethod
    def current(cls, fingerprint: str, precision: str, opset: int,
                targets: frozenset[str] | None = None, recipe: Int8Recipe | None = None) -> GraphKey:
        """``recipe``: the int8 graph's (default: ``DEFAULT_RECIPE``); ignored for fp32."""
        import onnx
        import onnxruntime
        import torch

        from adapters.runtime.onnx.quantize import DEFAULT_RECIPE

        if precision not in PRECISIONS:
            raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
        quantization = (recipe or DEFAULT_RECIPE).key if precision == "int8" else ""
        return cls(fingerprint=fingerprint, precision=precision, opset=opset, layout=LAYOUT_VERSION,
                   torch=torch.__version__, onnx=onnx.__version__, onnxruntime=onnxruntime.__version__,
                   targets=targets_value(targets), quantization=quantization)

    def fields(self) -> dict[str, object]:
        """The key as its digest and sidecar spell it (fp32: without the empty ``quantization``,
        so graphs cached before the field existed keep their digest and sidecar)."""
        fields = asdict(self)
        if not self.quantization:
            del fields["quantization"]
        return fields

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()[:40]


class GraphCache:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def paths(self, key: GraphKey) -> tuple[Path, Path]:
        return self.root / f"{key.digest}.onnx", self.root / f"{key.digest}.json"

    def load(self, key: GraphKey) -> bytes | None:
        """The stored graph of ``key``, or None (absent, or refused: the reason is logged)."""
        graph_path, meta_path = self.paths(key)
        if not meta_path.exists():
            return None
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            data = graph_path.read_bytes()
        except (OSError, ValueError) as e:
            log.warning("ONNX graph cache: %s unreadable (%s); rebuilding", graph_path.name, e)
            return None
        if meta.get("key") != key.fields():
            log.warning("ONNX graph cache: %s was built for base %s (%s), not %s (%s); rebuilding",
                        graph_path.name, str(meta.get("key", {}).get("fingerprint"))[:19],
                        meta.get("key", {}).get("precision"), key.fingerprint[:19], key.precision)
            return None
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if meta.get("sha256") != digest:
            log.warning("ONNX graph cache: %s fails its checksum (%s, expected %s); rebuilding",
                        graph_path.name, digest[:19], str(meta.get("sha256"))[:19])
            return None
        try:
            check_graph_base(graph_metadata(data), key.fingerprint, key.precision, parse_targets(key.targets))
        except (GraphMismatchError, ValueError) as e:
            log.warning("ONNX graph cache: %s refused: %s; rebuilding", graph_path.name, e)
            return None
        return data

    def store(self, key: GraphKey, data: bytes, extra: dict | None = None) -> None:
        graph_path, meta_path = self.paths(key)
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"key": key.fields(), "sha256": "sha256:" + hashlib.sha256(data).hexdigest(), "bytes": len(data),
                **(extra or {})}
        _atomic_write(graph_path, data)
        _atomic_write(meta_path, json.dumps(meta, indent=1, sort_keys=True).encode())

    def get(self, key: GraphKey, build: Callable[[], tuple[bytes, dict]]) -> tuple[bytes, bool]:
        """(the graph of ``key``, whether it was built now). ``build()`` returns the graph's
        bytes and extra facts for the sidecar (export time, parity)."""
        data = self.load(key)
        if data is not None:
            return data, False
        with self._lock(key):
            data = self.load(key)  # another process may have built it while we waited
            if data is not None:
                return data, False
            data, extra = build()
            self.store(key, data, extra)
            return data, True

    @contextmanager
    def _lock(self, key: GraphKey) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{key.digest}.lock", "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def stamp(graph: bytes, fingerprint: str, precision: str, targets: frozenset[str] | None = None) -> bytes:
    """The graph with its base fingerprint, precision and target set in its metadata."""
    import onnx

    model = onnx.load_from_string(graph)
    props = {p.key: p.value for p in model.metadata_props}
    props.update({FINGERPRINT_PROP: fingerprint, PRECISION_PROP: precision, TARGETS_PROP: targets_value(targets)})
    del model.metadata_props[:]
    for k, v in sorted(props.items()):
        model.metadata_props.add(key=k, value=v)
    return model.SerializeToString()


def graph_metadata(graph: bytes) -> dict[str, str]:
    """The graph's metadata properties (``ValueError`` for bytes that are not an ONNX model)."""
    import onnx

    try:
        model = onnx.load_from_string(graph)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends
        raise ValueError(f"not an ONNX model ({type(e).__name__})") from None
    return {p.key: p.value for p in model.metadata_props}


def check_graph_base(metadata: dict[str, str], fingerprint: str, precision: str,
                     targets: frozenset[str] | None = None) -> None:
    """Refuse (``GraphMismatchError``) a graph whose metadata names another base, precision or
    target set (``targets``: the set expected; None: every adaptable layer)."""
    got = metadata.get(FINGERPRINT_PROP)
    if got != fingerprint:
        raise GraphMismatchError(f"the ONNX graph was exported from base {str(got)[:19]}..., "
                                 f"not this base {fingerprint[:19]}...")
    if metadata.get(PRECISION_PROP) != precision:
        raise GraphMismatchError(f"the ONNX graph is {metadata.get(PRECISION_PROP)}, not {precision}")
    got_targets = parse_targets(metadata.get(TARGETS_PROP))
    if got_targets != targets:
        raise GraphMismatchError(f"the ONNX graph adapts {_count(got_targets)}, not {_count(targets)}")


def _count(targets: frozenset[str] | None) -> str:
    return "every adaptable layer" if targets is None else f"{len(targets)} layers"
