"""The adapter artifact format: exact round trips, and refusal of every corrupt or hostile input.

Every malformed input must surface as ``ArtifactError`` (never a KeyError, TypeError,
RecursionError, ...) with a message that says what is wrong: the service maps that one error type
to a 4xx answer, anything else would be a 500 on an untrusted upload.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import struct
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from adapters.artifact import (
    MAX_MANIFEST_BYTES,
    AdapterArtifact,
    AdapterManifest,
    AdapterWeights,
    LoraSettings,
)
from adapters.base import BaseModel, tiny_base
from adapters.errors import ArtifactError, ChecksumMismatchError, FingerprintMismatchError
from adapters.synthetic import random_artifact

Q0 = "bert.encoder.layer.0.attention.self.query"  # a [32 -> 32] linear of the tiny base


@pytest.fixture(scope="module")
def base() -> BaseModel:
    return tiny_base(seed=1)


@pytest.fixture(scope="module")
def art(base: BaseModel) -> AdapterArtifact:
    a = random_artifact(base.spec, r=4, targets=("query", "value"), n_labels=3, seed=7)
    return AdapterArtifact(manifest=replace(a.manifest, metrics={"accuracy": 0.91, "n": 120}), weights=a.weights)


@pytest.fixture(scope="module")
def encoded(art: AdapterArtifact) -> tuple[bytes, bytes, AdapterManifest]:
    return art.encode()


def raw_safetensors(header: dict, payload: bytes) -> bytes:
    """A safetensors file written by hand, so the header can say anything."""
    h = json.dumps(header).encode()
    return struct.pack("<Q", len(h)) + h + payload


def tensors_of(art: AdapterArtifact) -> dict[str, torch.Tensor]:
    w = art.weights
    out = {"head.weight": w.head_weight, "head.bias": w.head_bias}
    for path, (a, b) in w.lora.items():
        out[f"lora.{path}.A"], out[f"lora.{path}.B"] = a, b
    return out


def manifest_for(blob: bytes, m: AdapterManifest) -> AdapterManifest:
    """``m`` with the checksum of ``blob``: as if a corrupt file had been stored with its own hash."""
    return replace(m, weights_sha256=hashlib.sha256(blob).hexdigest(), weights_bytes=len(blob))


# --- round trip -------------------------------------------------------------------------------


def test_encode_decode_round_trip_is_bit_identical(art: AdapterArtifact, encoded) -> None:
    blob, mbytes, m = encoded
    assert m.weights_sha256 == hashlib.sha256(blob).hexdigest()
    assert m.weights_bytes == len(blob)
    assert art.manifest.weights_sha256 == "" and art.manifest.weights_bytes == 0  # input untouched
    on_disk = json.loads(mbytes)
    assert on_disk["weights_sha256"] == m.weights_sha256 and on_disk["weights_bytes"] == len(blob)

    for manifest in (mbytes, json.loads(mbytes), m):  # bytes, dict and parsed forms
        back = AdapterArtifact.decode(blob, manifest)
        assert back.manifest == m
        want, got = tensors_of(art), tensors_of(back)
        assert set(got) == set(want)
        for key in want:
            assert got[key].dtype == want[key].dtype
            assert torch.equal(got[key], want[key]), key
    back = AdapterArtifact.decode(blob, mbytes)
    mm = back.manifest
    assert mm.base_fingerprint == art.manifest.base_fingerprint
    assert mm.labels == ("label_0", "label_1", "label_2")
    assert mm.lora == LoraSettings(r=4, alpha=8.0, target_modules=("query", "value"))
    assert mm.head_in_features == 32 and mm.task == "classification"
    assert mm.created_at == art.manifest.created_at and mm.source == "synthetic"
    assert mm.metrics == {"accuracy": 0.91, "n": 120}
    assert back.rank == 4
    # encoding is deterministic: the same artifact gives the same bytes and hash
    assert back.encode()[0] == blob


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_round_trip(art: AdapterArtifact, dtype: torch.dtype) -> None:
    w = art.weights
    half = AdapterArtifact(manifest=art.manifest, weights=AdapterWeights(
        lora={p: (a.to(dtype), b.to(dtype)) for p, (a, b) in w.lora.items()},
        head_weight=w.head_weight.to(dtype), head_bias=w.head_bias.to(dtype)))
    blob, mbytes, _ = half.encode()
    back = AdapterArtifact.decode(blob, mbytes)
    for key, t in tensors_of(half).items():
        assert tensors_of(back)[key].dtype == dtype
        assert torch.equal(tensors_of(back)[key], t)


# --- integrity and size -----------------------------------------------------------------------


def test_flipped_byte_is_a_checksum_mismatch(encoded) -> None:
    blob, mbytes, m = encoded
    bad = bytearray(blob)
    bad[-3] ^= 0x01  # inside the last tensor's data: still a well-formed safetensors file
    bad = bytes(bad)
    actual = hashlib.sha256(bad).hexdigest()
    with pytest.raises(ChecksumMismatchError) as e:
        AdapterArtifact.decode(bad, mbytes)
    assert actual in str(e.value) and m.weights_sha256 in str(e.value)
    assert e.value.code == "checksum_mismatch"


def test_oversized_weights_are_refused_naming_the_limit(encoded) -> None:
    blob, mbytes, _ = encoded
    with pytest.raises(ArtifactError) as e:
        AdapterArtifact.decode(blob, mbytes, max_bytes=len(blob) - 1)
    assert f"{len(blob) - 1} byte limit" in str(e.value) and str(len(blob)) in str(e.value)
    assert AdapterArtifact.decode(blob, mbytes, max_bytes=len(blob)).rank == 4  # at the limit: fine


# --- malformed safetensors --------------------------------------------------------------------


def _malformed(blob: bytes) -> dict[str, bytes]:
    g = torch.Generator().manual_seed(0)
    return {
        "empty": b"",
        "random bytes": bytes(torch.randint(0, 256, (4096,), generator=g, dtype=torch.uint8).tolist()),
        "truncated data": blob[:-7],
        "truncated header": blob[:20],
        "header length of 2**62": struct.pack("<Q", 1 << 62) + b"{}",
        "header length past the end": struct.pack("<Q", 1000) + b'{"a": 1}',
        "shape of 2**60 elements": raw_safetensors(
            {"head.weight": {"dtype": "F32", "shape": [1 << 40, 1 << 20], "data_offsets": [0, 16]}}, bytes(16)),
        "offsets past the end": raw_safetensors(
            {"head.weight": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}}, bytes(16)),
        "header not JSON": struct.pack("<Q", 8) + b"{not js}",
        "header not UTF-8": struct.pack("<Q", 2) + b"\xff\xfe",
        "dtype torch lacks (F4)": raw_safetensors(
            {"head.weight": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]}}, bytes(4)),
        "dtype torch lacks (F8_E8M0)": raw_safetensors(
            {"head.weight": {"dtype": "F8_E8M0", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
        "unknown dtype": raw_safetensors(
            {"head.weight": {"dtype": "Q4_K", "shape": [4], "data_offsets": [0, 4]}}, bytes(4)),
    }


@pytest.mark.parametrize("case", list(_malformed(b"x" * 100)))
def test_malformed_safetensors_is_an_artifact_error(encoded, case: str) -> None:
    blob, _, m = encoded
    bad = _malformed(blob)[case]
    with pytest.raises(ArtifactError, match="not a valid safetensors file") as e:
        AdapterArtifact.decode(bad, manifest_for(bad, m))
    assert type(e.value) is ArtifactError
    with pytest.raises(ArtifactError, match="not a valid safetensors file"):
        AdapterWeights.from_safetensors(bad)


def _bad_weights(art: AdapterArtifact) -> dict[str, tuple[dict[str, torch.Tensor], str]]:
    t = tensors_of(art)
    q_a, q_b = f"lora.{Q0}.A", f"lora.{Q0}.B"

    def without(*keys: str) -> dict[str, torch.Tensor]:
        return {k: v for k, v in t.items() if k not in keys}

    def with_(key: str, value: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**t, key: value}

    nan_b = t[q_b].clone()
    nan_b[3, 1] = float("nan")
    inf_head = t["head.weight"].clone()
    inf_head[0, 0] = float("inf")
    return {
        "unexpected key": (with_("optimizer.state", torch.zeros(3)), "unexpected tensor 'optimizer.state'"),
        "bad key grammar": (with_("lora.bert/../x.A", torch.zeros(4, 32)), "unexpected tensor"),
        "third lora part": (with_(f"lora.{Q0}.C", torch.zeros(4, 32)), "unexpected tensor"),
        "missing head.weight": (without("head.weight"), "lack 'head.weight'"),
        "missing head.bias": (without("head.bias"), "lack 'head.bias'"),
        "A without B": (without(q_b), f"module '{Q0}' needs both lora A and B"),
        "B without A": (without(q_a), f"module '{Q0}' needs both lora A and B"),
        "no lora at all": ({"head.weight": t["head.weight"], "head.bias": t["head.bias"]}, "no LoRA tensors"),
        "int32 head": (with_("head.weight", torch.ones(3, 32, dtype=torch.int32)), "dtype torch.int32"),
        "int64 lora": (with_(q_a, torch.ones(4, 32, dtype=torch.int64)), "dtype torch.int64"),
        "bool": (with_("head.bias", torch.ones(3, dtype=torch.bool)), "dtype torch.bool"),
        "float64": (with_(q_a, t[q_a].double()), "dtype torch.float64"),
        "NaN": (with_(q_b, nan_b), "NaN or infinite"),
        "inf": (with_("head.weight", inf_head), "NaN or infinite"),
        "rank mismatch": (with_(q_b, torch.zeros(32, 3)), "do not form a rank-r pair"),
        "1-d A": (with_(q_a, torch.zeros(32)), "do not form a rank-r pair"),
        "rank 0": (with_(q_a, torch.zeros(0, 32)) | {q_b: torch.zeros(32, 0)}, "rank 0 outside 1..256"),
        "rank 257": (with_(q_a, torch.zeros(257, 32)) | {q_b: torch.zeros(32, 257)}, "rank 257 outside"),
        "head with 2 rows for 3 labels": (with_("head.weight", torch.zeros(2, 32)),
                                          r"head.weight has shape \[2, 32\], expected \[3, 32\] for 3 labels"),
        "head reading 16 features": (with_("head.weight", torch.zeros(3, 16)), r"expected \[3, 32\]"),
        "bias of 2 for 3 labels": (with_("head.bias", torch.zeros(2)), r"head.bias has shape \[2\], expected \[3\]"),
    }


@pytest.mark.parametrize("case", [
    "unexpected key", "bad key grammar", "third lora part", "missing head.weight", "missing head.bias",
    "A without B", "B without A", "no lora at all", "int32 head", "int64 lora", "bool", "float64", "NaN",
    "inf", "rank mismatch", "1-d A", "rank 0", "rank 257", "head with 2 rows for 3 labels",
    "head reading 16 features", "bias of 2 for 3 labels",
])
def test_well_formed_file_with_bad_contents_is_refused(art: AdapterArtifact, encoded, case: str) -> None:
    tensors, message = _bad_weights(art)[case]
    bad = st_save({k: v.contiguous() for k, v in tensors.items()})
    with pytest.raises(ArtifactError, match=message) as e:
        AdapterArtifact.decode(bad, manifest_for(bad, encoded[2]))
    assert type(e.value) is ArtifactError


def test_invalid_tensors_cannot_be_encoded_either(art: AdapterArtifact) -> None:
    """validate() checks dtypes and values too, so a bad in-memory artifact is never stored."""
    w = art.weights
    path = next(iter(w.lora))
    a, b = w.lora[path]
    for bad_b, message in ((b.to(torch.int32), "dtype torch.int32"), (b * float("nan"), "NaN or infinite")):
        bad = AdapterArtifact(manifest=art.manifest, weights=replace(w, lora={**w.lora, path: (a, bad_b)}))
        with pytest.raises(ArtifactError, match=message):
            bad.encode()


# --- pickle is never loaded -------------------------------------------------------------------


class _Tripwire:
    """Unpickling this creates a file: proof of whether anything ever unpickled the bytes."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return (Path.touch, (self.path,))


def test_pickled_weights_are_refused_without_being_loaded(encoded, tmp_path: Path) -> None:
    _, _, m = encoded
    tripwire = tmp_path / "unpickled"
    payloads = {
        "pickle.dumps": pickle.dumps({"head.weight": torch.randn(3, 32), "head.bias": torch.randn(3),
                                      "trap": _Tripwire(tripwire)}),
        "pickle protocol 2": pickle.dumps({"head.weight": torch.randn(3, 32), "trap": _Tripwire(tripwire)},
                                          protocol=2),
    }
    buf = io.BytesIO()
    torch.save({"head.weight": torch.randn(3, 32), "head.bias": torch.randn(3)}, buf)
    payloads["torch.save"] = buf.getvalue()
    for name, data in payloads.items():
        with pytest.raises(ArtifactError, match="not a valid safetensors file"):
            AdapterArtifact.decode(data, manifest_for(data, m))
    assert not tripwire.exists()


# --- manifest validation ----------------------------------------------------------------------


def _set(path: str, value):
    def f(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return f


def _del(path: str):
    def f(d: dict) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        del d[last]
    return f


MANIFEST_CASES = {
    # missing fields: the message names the field
    "no base_fingerprint": (_del("base_fingerprint"), "missing field 'base_fingerprint'"),
    "no labels": (_del("labels"), "missing field 'labels'"),
    "no lora": (_del("lora"), "missing field 'lora'"),
    "no head_in_features": (_del("head_in_features"), "missing field 'head_in_features'"),
    "no lora.r": (_del("lora.r"), "missing field 'r'"),
    "no lora.alpha": (_del("lora.alpha"), "missing field 'alpha'"),
    "no lora.target_modules": (_del("lora.target_modules"), "missing field 'target_modules'"),
    # wrong types
    "labels a string": (_set("labels", "pos,neg"), "'labels' must be a list of strings"),
    "labels of ints": (_set("labels", [0, 1]), "'labels' must be a list of strings"),
    "lora a string": (_set("lora", "r=4"), "'lora' must be an object"),
    "lora a list": (_set("lora", [4, 8]), "'lora' must be an object"),
    "lora null": (_set("lora", None), "'lora' must be an object"),
    "r a string": (_set("lora.r", "4"), "'lora.r' must be an integer"),
    "r a float": (_set("lora.r", 4.0), "'lora.r' must be an integer"),
    "r a bool": (_set("lora.r", True), "'lora.r' must be an integer"),
    "alpha a string": (_set("lora.alpha", "8"), "'lora.alpha' must be a number"),
    "alpha a bool": (_set("lora.alpha", True), "'lora.alpha' must be a number"),
    "use_rslora a string": (_set("lora.use_rslora", "false"), "'lora.use_rslora' must be true or false"),
    "target_modules a string": (_set("lora.target_modules", "query"), "'lora.target_modules' must be a list"),
    "target_modules empty": (_set("lora.target_modules", []), "target_modules is empty"),
    "head_in_features a string": (_set("head_in_features", "32"), "'head_in_features' must be an integer"),
    "head_in_features 0": (_set("head_in_features", 0), "'head_in_features' must be an integer in 1"),
    "base_fingerprint a number": (_set("base_fingerprint", 5), "'base_fingerprint' must be a string"),
    "weights_sha256 a number": (_set("weights_sha256", 5), "'weights_sha256' must be a string"),
    "weights_bytes negative": (_set("weights_bytes", -1), "'weights_bytes' must be an integer"),
    "metrics a list": (_set("metrics", [1, 2]), "'metrics' must be an object"),
    "metrics a string": (_set("metrics", "ab"), "'metrics' must be an object"),
    "task a number": (_set("task", 3), "'task' must be a string"),
    # values
    "one label": (_set("labels", ["only"]), "needs 2 to 1000 labels, got 1"),
    "no labels at all": (_set("labels", []), "needs 2 to 1000 labels, got 0"),
    "1001 labels": (_set("labels", [f"l{i}" for i in range(1001)]), "got 1001"),
    "duplicate labels": (_set("labels", ["pos", "neg", "pos"]), "labels must be unique"),
    "empty label": (_set("labels", ["pos", "", "neg"]), "must have 1 to 128 characters"),
    "label too long": (_set("labels", ["pos", "x" * 129, "neg"]), "must have 1 to 128 characters"),
    "unknown task": (_set("task", "generation"), "unsupported task .generation.; supported: text-classification, "
                     "image-classification, text-generation, classification"),
    "rank 0": (_set("lora.r", 0), r"'lora.r' must be an integer in 1..256"),
    "rank 257": (_set("lora.r", 257), r"'lora.r' must be an integer in 1..256"),
    "alpha 0": (_set("lora.alpha", 0), "lora.alpha must be a positive number"),
    "alpha negative": (_set("lora.alpha", -8), "lora.alpha must be a positive number"),
    "alpha NaN": (_set("lora.alpha", math.nan), "lora.alpha must be a positive number"),
    "alpha infinite": (_set("lora.alpha", math.inf), "lora.alpha must be a positive number"),
    "format_version 2": (_set("format_version", 2), "unsupported manifest format_version 2"),
    "head shape vs label count": (_set("labels", ["a", "b"]),
                                  r"head.weight has shape \[3, 32\], expected \[2, 32\] for 2 labels"),
    "head_in_features vs head": (_set("head_in_features", 16), r"expected \[3, 16\]"),
}


@pytest.mark.parametrize("case", list(MANIFEST_CASES))
def test_manifest_validation(encoded, case: str) -> None:
    blob, _, m = encoded
    mutate, message = MANIFEST_CASES[case]
    d = m.to_dict()
    mutate(d)
    data = json.dumps(d).encode()
    with pytest.raises(ArtifactError, match=message) as e:
        AdapterArtifact.decode(blob, data)
    assert type(e.value) is ArtifactError
    with pytest.raises(ArtifactError, match=message):  # the dict form is checked the same way
        AdapterArtifact.decode(blob, d)


@pytest.mark.parametrize("data, message", [
    (b"{not json", "not valid UTF-8 JSON"),
    (b"\xff\xfe{}", "not valid UTF-8 JSON"),
    (b"", "not valid UTF-8 JSON"),
    (b"[1, 2]", "manifest must be a JSON object"),
    (b'"manifest"', "manifest must be a JSON object"),
    (b"null", "manifest must be a JSON object"),
    (b"[" * 200_000, "not valid UTF-8 JSON"),  # nesting deeper than the parser's recursion limit
    (b'{"weights_bytes": ' + b"9" * 5000 + b"}", "not valid UTF-8 JSON"),  # int too long to parse
    (b" " * (MAX_MANIFEST_BYTES + 1), f"over the {MAX_MANIFEST_BYTES} limit"),
], ids=["not json", "not utf-8", "empty", "a list", "a string", "null", "deep nesting", "huge int", "over 1 MiB"])
def test_manifest_bytes_that_are_not_a_json_object(encoded, data: bytes, message: str) -> None:
    with pytest.raises(ArtifactError, match=message) as e:
        AdapterArtifact.decode(encoded[0], data)
    assert type(e.value) is ArtifactError


def test_in_memory_manifest_with_bad_rank_cannot_be_encoded(art: AdapterArtifact) -> None:
    for r in (0, 300):
        bad = AdapterArtifact(manifest=replace(art.manifest, lora=replace(art.manifest.lora, r=r)),
                              weights=art.weights)
        with pytest.raises(ArtifactError, match="lora.r must be in 1..256"):
            bad.encode()


# --- check_base -------------------------------------------------------------------------------


def test_check_base_accepts_its_own_base(base: BaseModel, encoded) -> None:
    AdapterArtifact.decode(encoded[0], encoded[1]).check_base(base.spec)


def test_artifact_for_another_base_is_refused(base: BaseModel, encoded) -> None:
    other = tiny_base(seed=2)  # same architecture and shapes, other weights
    assert other.spec.linear_shapes == base.spec.linear_shapes
    art = AdapterArtifact.decode(encoded[0], encoded[1])
    with pytest.raises(FingerprintMismatchError) as e:
        art.check_base(other.spec)
    assert base.spec.fingerprint[:23] in str(e.value) and other.spec.fingerprint[:23] in str(e.value)
    assert e.value.code == "base_mismatch"


def _with_lora(art: AdapterArtifact, lora: dict, **manifest_changes) -> AdapterArtifact:
    return AdapterArtifact(manifest=replace(art.manifest, **manifest_changes),
                           weights=replace(art.weights, lora=lora))


@pytest.mark.parametrize("case", ["unknown module", "classifier head", "wrong in dim", "wrong out dim",
                                  "head width"])
def test_check_base_refuses_what_does_not_fit(base: BaseModel, art: AdapterArtifact, case: str) -> None:
    a, b = torch.randn(4, 32), torch.randn(32, 4)
    lora = dict(art.weights.lora)
    if case == "unknown module":
        lora["bert.encoder.layer.7.attention.self.query"] = (a, b)  # the base has 2 layers
        message = "'bert.encoder.layer.7.attention.self.query' is not a linear layer of the base model"
    elif case == "classifier head":
        lora["classifier"] = (a, torch.randn(2, 4))
        message = "'classifier' is not a linear layer"
    elif case == "wrong in dim":
        lora[Q0] = (torch.randn(4, 48), b)
        message = r"lora A \[4, 48\] / B \[32, 4\] do not fit a \[32 -> 32\] layer"
    elif case == "wrong out dim":
        lora["bert.encoder.layer.1.intermediate.dense"] = (a, torch.randn(32, 4))  # 32 -> 64
        message = r"do not fit a \[32 -> 64\] layer"
    else:
        bad = AdapterArtifact(
            manifest=replace(art.manifest, head_in_features=16),
            weights=replace(art.weights, head_weight=torch.randn(3, 16)))
        lora, message = None, "head reads 16 features, the base gives 32"
    if lora is not None:
        bad = _with_lora(art, lora)
    blob, mbytes, _ = bad.encode()  # internally consistent: only the base can tell
    decoded = AdapterArtifact.decode(blob, mbytes)
    with pytest.raises(ArtifactError, match=message) as e:
        decoded.check_base(base.spec)
    assert type(e.value) is ArtifactError


def test_fingerprint_hashes_zero_dim_tensors_and_keeps_existing_fingerprints() -> None:
    import torch

    from adapters.fingerprint import fingerprint_model

    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    with_scalar = fingerprint_model({}, {"w": w, "step": torch.tensor(3.0)})
    assert with_scalar != fingerprint_model({}, {"w": w, "step": torch.tensor(4.0)})
    # the bytes hashed for an n-d tensor are unchanged (fingerprints of existing bases stay valid)
    assert w.view(torch.uint8).numpy().tobytes() == w.reshape(-1).view(torch.uint8).numpy().tobytes()
