"""Interchange with peft: our exports load in peft, peft-trained adapters import with the same logits.

peft itself is the reference: an adapter trained "elsewhere" with ``get_peft_model`` and saved with
``save_pretrained`` must give, once imported and served by our engine, the logits peft gives.
The zip helpers that carry these files over HTTP refuse bombs, paths and garbage.
"""

from __future__ import annotations

import copy
import io
import itertools
import json
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from adapters.artifact import AdapterArtifact
from adapters.base import tiny_base
from adapters.errors import ArtifactError
from adapters.peft_format import (
    CONFIG_FILE,
    TAILOR_FILE,
    WEIGHTS_FILE,
    export_peft,
    import_peft,
    unzip_files,
    zip_files,
)
from adapters.runtime.context import use_plan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_layer import wrap_linears
from adapters.runtime.slots import SlotBank
from adapters.synthetic import random_artifact

TEXTS = ["the service was quick and friendly", "terrible, never again", "an ordinary day at the office",
         "prices went up again this quarter"]
PREFIX = "base_model.model."


class Env:
    """The tiny base three ways: pristine (for peft), wrapped by our engine, and its spec."""

    def __init__(self) -> None:
        self.base = tiny_base(seed=1)
        self.spec = self.base.spec
        self.pristine = copy.deepcopy(self.base.model)
        self.engine = copy.deepcopy(self.pristine)
        wrap_linears(self.engine, list(self.spec.linear_shapes))
        setattr(self.engine, self.base.head_name, MixedHead(self.spec.head_in_features))
        self.bank = SlotBank(self.spec.linear_shapes, self.spec.head_in_features, 4,
                             self.base.device, self.base.dtype)
        self.inputs = self.base.tokenize(TEXTS)
        self._ids = itertools.count()

    def fresh_base(self, n_labels: int) -> nn.Module:
        """A copy of the pristine base with its classifier resized, as peft users set it up."""
        model = copy.deepcopy(self.pristine)
        setattr(model, self.base.head_name, nn.Linear(self.spec.head_in_features, n_labels))
        return model

    def engine_logits(self, art: AdapterArtifact) -> torch.Tensor:
        key = VersionKey("t", f"a{next(self._ids)}", 1, "sha")
        loaded = LoadedAdapter.from_artifact(key, art, self.base.dtype)
        plan = self.bank.plan([loaded] * len(TEXTS))
        with torch.inference_mode(), use_plan(plan):
            logits = self.engine(**self.inputs).logits
        return logits[:, : len(art.manifest.labels)]

    def peft_logits(self, model: nn.Module) -> torch.Tensor:
        with torch.inference_mode():
            return model.eval()(**self.inputs).logits

    def load_in_peft(self, files: dict[str, bytes], n_labels: int, tmp: Path) -> nn.Module:
        tmp.mkdir()
        for name, data in files.items():
            (tmp / name).write_bytes(data)
        return PeftModel.from_pretrained(self.fresh_base(n_labels), str(tmp)).eval()


@pytest.fixture(scope="module")
def env() -> Env:
    return Env()


def trained_elsewhere(env: Env, tmp: Path, *, n_labels: int = 3, seed: int = 0, **lora_kwargs):
    """An adapter as a peft user makes one: get_peft_model, (pretend) training, save_pretrained."""
    kwargs = dict(task_type="SEQ_CLS", r=4, lora_alpha=16, target_modules=["query", "value"]) | lora_kwargs
    model = get_peft_model(env.fresh_base(n_labels), LoraConfig(**kwargs))
    g = torch.Generator().manual_seed(seed)
    touched = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:  # peft initialises B to zero
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                touched += 1
    assert touched > 2
    model.eval()
    model.save_pretrained(str(tmp))
    files = {name: (tmp / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    return model, files


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


def all_tensors(art: AdapterArtifact) -> dict[str, torch.Tensor]:
    w = art.weights
    out = {"head.weight": w.head_weight, "head.bias": w.head_bias}
    for path, (a, b) in w.lora.items():
        out[f"{path}.A"], out[f"{path}.B"] = a, b
    return out


# --- ours -> peft files -> ours -----------------------------------------------------------------


@pytest.mark.parametrize("use_rslora", [False, True])
def test_round_trip_through_peft_files(env: Env, use_rslora: bool) -> None:
    art = random_artifact(env.spec, r=4, targets=("query", "value", "output.dense"), n_labels=3, seed=5,
                          use_rslora=use_rslora)
    art = AdapterArtifact(manifest=replace(art.manifest, metrics={"accuracy": 0.8}), weights=art.weights)
    files = export_peft(art, env.spec)
    assert set(files) == {CONFIG_FILE, WEIGHTS_FILE, TAILOR_FILE}
    config = json.loads(files[CONFIG_FILE])
    assert config["peft_type"] == "LORA" and config["task_type"] == "SEQ_CLS"
    assert config["modules_to_save"] == ["classifier"] and config["rank_pattern"] == {}

    back = import_peft(files, env.spec)
    want, got = all_tensors(art), all_tensors(back)
    assert set(got) == set(want)
    for key in want:
        assert torch.equal(got[key], want[key]), key
    m = back.manifest
    assert m.labels == ("label_0", "label_1", "label_2")  # read back from tailor_manifest.json
    assert m.metrics == {"accuracy": 0.8}
    assert m.lora.r == 4 and m.lora.alpha == art.manifest.lora.alpha and m.lora.use_rslora is use_rslora
    assert m.lora.scale == art.manifest.lora.scale
    assert set(m.lora.target_modules) == {"query", "value", "output.dense"}
    assert m.base_fingerprint == env.spec.fingerprint and m.source == "peft"

    relabelled = import_peft(files, env.spec, labels=["neg", "neu", "pos"], metrics={"f1": 0.5})
    assert relabelled.manifest.labels == ("neg", "neu", "pos") and relabelled.manifest.metrics == {"f1": 0.5}
    # the imported artifact is a normal one: it encodes, decodes and serves like the original
    blob, mbytes, _ = back.encode()
    assert max_diff(env.engine_logits(AdapterArtifact.decode(blob, mbytes)), env.engine_logits(art)) == 0.0


def test_our_export_loads_in_peft_with_the_same_logits(env: Env, tmp_path: Path) -> None:
    art = random_artifact(env.spec, r=4, targets=("query", "value"), n_labels=3, seed=6, alpha=8)
    model = env.load_in_peft(export_peft(art, env.spec), 3, tmp_path / "a")
    assert max_diff(env.engine_logits(art), env.peft_logits(model)) <= 1e-5


@pytest.mark.parametrize("use_rslora", [False, True])
def test_mixed_rank_export_loads_in_peft_with_the_same_logits(env: Env, tmp_path: Path, use_rslora: bool) -> None:
    """Per-module ranks go out as rank_pattern + alpha_pattern that keep each module's scale."""
    q = random_artifact(env.spec, r=4, targets=("query",), n_labels=4, seed=7, alpha=8, use_rslora=use_rslora)
    v = random_artifact(env.spec, r=8, targets=("value",), n_labels=4, seed=8)
    d = random_artifact(env.spec, r=2, targets=("intermediate.dense",), n_labels=4, seed=9)
    lora = replace(q.manifest.lora, target_modules=("query", "value", "intermediate.dense"))
    art = AdapterArtifact(manifest=replace(q.manifest, lora=lora), weights=replace(
        q.weights, lora=q.weights.lora | v.weights.lora | d.weights.lora))
    files = export_peft(art, env.spec)
    config = json.loads(files[CONFIG_FILE])
    assert config["target_modules"] == ["intermediate.dense", "query", "value"]
    assert set(config["rank_pattern"].values()) == {8, 2} and len(config["alpha_pattern"]) == 4

    model = env.load_in_peft(files, 4, tmp_path / "mixed")
    ranks = {n.split(".lora_A")[0]: p.shape[0] for n, p in model.named_parameters() if "lora_A" in n}
    assert sorted(set(ranks.values())) == [2, 4, 8]
    ours = env.engine_logits(art)
    assert max_diff(ours, env.peft_logits(model)) <= 1e-5
    # and back again: the re-imported adapter still serves the same logits
    assert max_diff(env.engine_logits(import_peft(files, env.spec)), ours) <= 1e-5


def test_export_targets_every_module_the_weights_hold(env: Env, tmp_path: Path) -> None:
    """A manifest whose target_modules under-describe the weights must not lose modules in peft."""
    q = random_artifact(env.spec, r=4, targets=("query",), n_labels=2, seed=12)
    k = random_artifact(env.spec, r=4, targets=("key",), n_labels=2, seed=13)
    art = AdapterArtifact(manifest=q.manifest, weights=replace(q.weights, lora=q.weights.lora | k.weights.lora))
    files = export_peft(art, env.spec)
    assert json.loads(files[CONFIG_FILE])["target_modules"] == sorted(art.weights.lora)
    model = env.load_in_peft(files, 2, tmp_path / "a")
    assert max_diff(env.engine_logits(art), env.peft_logits(model)) <= 1e-5


# --- trained elsewhere with peft -> ours --------------------------------------------------------


def test_adapter_trained_with_peft_imports_with_the_same_logits(env: Env, tmp_path: Path) -> None:
    model, files = trained_elsewhere(env, tmp_path)
    art = import_peft(files, env.spec)
    m = art.manifest
    assert m.labels == ("LABEL_0", "LABEL_1", "LABEL_2")  # no tailor_manifest.json
    assert m.lora.r == 4 and m.lora.alpha == 16 and m.lora.target_modules == ("query", "value")
    assert m.source == "peft" and m.metrics == {}
    assert sorted(art.weights.lora) == sorted(p for p in env.spec.linear_shapes if p.endswith((".query", ".value")))

    want = env.peft_logits(model)
    got = env.engine_logits(art)
    assert max_diff(got, want) <= 1e-5
    # the LoRA part matters: with B zeroed the logits move well away from peft's
    zero_b = replace(art.weights, lora={p: (a, torch.zeros_like(b)) for p, (a, b) in art.weights.lora.items()})
    assert max_diff(env.engine_logits(AdapterArtifact(manifest=m, weights=zero_b)), want) > 1e-3
    assert import_peft(files, env.spec, labels=["a", "b", "c"]).manifest.labels == ("a", "b", "c")


@pytest.mark.parametrize("patterns", [
    dict(rank_pattern={"value": 8}, alpha_pattern={"value": 4}),
    dict(rank_pattern={"value": 8}, alpha_pattern={"value": 4}, use_rslora=True),
    dict(target_modules=["query", "value", "dense"],
         rank_pattern={"layer.0.attention.self.query": 2, "intermediate.dense": 6},
         alpha_pattern={"output.dense": 3}),
], ids=["rank+alpha", "rank+alpha rslora", "per-layer keys"])
def test_peft_rank_and_alpha_patterns_import_with_the_same_logits(env: Env, tmp_path: Path, patterns) -> None:
    model, files = trained_elsewhere(env, tmp_path, seed=3, **patterns)
    art = import_peft(files, env.spec)
    ranks = {p: a.shape[0] for p, (a, _) in art.weights.lora.items()}
    assert len(set(ranks.values())) > 1  # the pattern really gave modules other ranks
    assert max_diff(env.engine_logits(art), env.peft_logits(model)) <= 1e-5


# --- refusals ----------------------------------------------------------------------------------


def _edit_config(**changes):
    def f(files: dict[str, bytes], env: Env) -> None:
        config = json.loads(files[CONFIG_FILE])
        config.update(changes)
        files[CONFIG_FILE] = json.dumps(config).encode()
    return f


def _edit_tensors(fn):
    def f(files: dict[str, bytes], env: Env) -> None:
        tensors = dict(st_load(files[WEIGHTS_FILE]))
        fn(tensors)
        files[WEIGHTS_FILE] = st_save({k: v.contiguous() for k, v in tensors.items()})
    return f


def _raw_weights(header: dict, payload: bytes):
    def f(files: dict[str, bytes], env: Env) -> None:
        h = json.dumps(header).encode()
        files[WEIGHTS_FILE] = struct.pack("<Q", len(h)) + h + payload
    return f


Q0 = "bert.encoder.layer.0.attention.self.query"
A0, B0 = f"{PREFIX}{Q0}.lora_A.weight", f"{PREFIX}{Q0}.lora_B.weight"


def _set_item(key, value):
    return lambda t: t.__setitem__(key, value)


def _nan(t: dict) -> None:
    t[B0] = t[B0].clone()
    t[B0][0, 0] = float("nan")


def _other_base_head(files: dict[str, bytes], env: Env) -> None:
    other = tiny_base(seed=1, hidden_size=48)  # another (wider) base of the same family
    files.update(export_peft(random_artifact(other.spec, r=4, n_labels=3, seed=1), other.spec))


REFUSALS = {
    "use_dora": (_edit_config(use_dora=True), "use_dora=True is not supported"),
    "CAUSAL_LM": (_edit_config(task_type="CAUSAL_LM"),
                  "only SEQ_CLS adapters are supported, got task_type 'CAUSAL_LM'"),
    "IA3": (_edit_config(peft_type="IA3"), "only LoRA adapters are supported, got peft_type 'IA3'"),
    "fan_in_fan_out": (_edit_config(fan_in_fan_out=True), "fan_in_fan_out=True is not supported"),
    "bias all": (_edit_config(bias="all"), "bias='all' is not supported"),
    "layers_to_transform": (_edit_config(layers_to_transform=[0]), "layers_to_transform=.0. is not supported"),
    "no r": (_edit_config(r=None), "needs numeric 'r' and 'lora_alpha'"),
    "r a word": (_edit_config(r="four"), "needs numeric 'r' and 'lora_alpha'"),
    "r infinite": (_edit_config(r=float("inf")), "needs numeric 'r' and 'lora_alpha'"),
    "r 0": (_edit_config(r=0), r"r must be in 1..256 and lora_alpha positive"),
    "r 1000": (_edit_config(r=1000), r"r must be in 1..256"),
    "alpha 0": (_edit_config(lora_alpha=0), "lora_alpha positive"),
    "alpha_pattern a list": (_edit_config(alpha_pattern=[1]), "alpha_pattern must be an object"),
    "alpha_pattern a word": (_edit_config(alpha_pattern={"value": "big"}),
                             "alpha_pattern value for .* is not a number"),
    "missing adapter_config.json": (lambda f, e: f.pop(CONFIG_FILE), "peft adapter lacks adapter_config.json"),
    "missing weights": (lambda f, e: f.pop(WEIGHTS_FILE), "peft adapter lacks adapter_model.safetensors"),
    "config not JSON": (lambda f, e: f.update({CONFIG_FILE: b"r: 4"}), "adapter_config.json is not valid JSON"),
    "config deeply nested": (lambda f, e: f.update({CONFIG_FILE: b"[" * 200_000}),
                             "adapter_config.json is not valid JSON"),
    "config a list": (lambda f, e: f.update({CONFIG_FILE: b"[]"}), "must hold a JSON object"),
    "weights garbage": (lambda f, e: f.update({WEIGHTS_FILE: b"PK\x03\x04 not safetensors"}),
                        "adapter_model.safetensors is not a valid safetensors file"),
    "weights dtype torch lacks": (_raw_weights({"x": {"dtype": "F4", "shape": [8], "data_offsets": [0, 4]}},
                                               bytes(4)), "not a valid safetensors file"),
    "no head": (_edit_tensors(lambda t: [t.pop(k) for k in list(t) if "classifier" in k]),
                "no classification head: expected 'classifier' in modules_to_save"),
    "1-d head": (_edit_tensors(_set_item(f"{PREFIX}classifier.weight", torch.zeros(96))),
                 r"classification head has shapes \[96\] / \[3\]"),
    "head bias of 2": (_edit_tensors(_set_item(f"{PREFIX}classifier.bias", torch.zeros(2))),
                       r"head.bias has shape \[2\], expected \[3\]"),
    "label count (argument)": (lambda f, e: None, "2 label names given for a head with 3 outputs"),
    "label count (tailor file)": (
        lambda f, e: f.update({TAILOR_FILE: export_peft(random_artifact(e.spec, n_labels=2), e.spec)[TAILOR_FILE]}),
        "2 label names given for a head with 3 outputs"),
    "tailor file garbage": (lambda f, e: f.update({TAILOR_FILE: b"{}"}), "manifest is missing field"),
    "unexpected tensor": (_edit_tensors(_set_item(f"{PREFIX}bert.embeddings.word_embeddings.weight",
                                                  torch.zeros(4, 32))), "unexpected tensor"),
    "A without B": (_edit_tensors(lambda t: t.pop(B0)), f"module '{Q0}' needs both lora_A and lora_B"),
    "integer dtype": (_edit_tensors(_set_item(A0, torch.ones(4, 32, dtype=torch.int32))), "dtype torch.int32"),
    "NaN": (_edit_tensors(_nan), "NaN or infinite"),
    "rank 0": (_edit_tensors(lambda t: t.update({A0: torch.zeros(0, 32), B0: torch.zeros(32, 0)})),
               "rank 0 outside"),
    "scalar A": (_edit_tensors(_set_item(A0, torch.tensor(1.0))), "do not form a rank-r pair"),
    "module not in base": (_edit_tensors(lambda t: t.update({
        f"{PREFIX}bert.encoder.layer.5.attention.self.query.lora_A.weight": torch.zeros(4, 32),
        f"{PREFIX}bert.encoder.layer.5.attention.self.query.lora_B.weight": torch.zeros(32, 4)})),
        "'bert.encoder.layer.5.attention.self.query' is not a linear layer of the base model"),
    "lora shapes of another base": (
        _edit_tensors(lambda t: t.update({A0: torch.zeros(4, 48), B0: torch.zeros(48, 4)})),
        r"do not fit a \[32 -> 32\] layer"),
    "adapter for another base": (_other_base_head, "head reads 48 features, the base gives 32"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_import_refusals(env: Env, case: str) -> None:
    good = random_artifact(env.spec, r=4, targets=("query", "value"), n_labels=3, seed=11)
    files = export_peft(good, env.spec)
    edit, message = REFUSALS[case]
    edit(files, env)
    labels = ["a", "b"] if case == "label count (argument)" else None
    with pytest.raises(ArtifactError, match=message) as e:
        import_peft(files, env.spec, labels=labels)
    assert type(e.value) is ArtifactError


# --- zip ---------------------------------------------------------------------------------------


def make_zip(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=compression) as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def patch_central(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    """Rewrite a field of the (only) central-directory entry: headers an attacker controls."""
    at = data.rindex(b"PK\x01\x02") + offset
    return data[:at] + struct.pack(fmt, value) + data[at + struct.calcsize(fmt):]


def test_zip_round_trip(env: Env) -> None:
    files = export_peft(random_artifact(env.spec, n_labels=3, seed=2), env.spec)
    data = zip_files(files)
    assert data[:4] == b"PK\x03\x04"
    assert unzip_files(data, max_bytes=1 << 20) == files
    back = import_peft(unzip_files(data, max_bytes=1 << 20), env.spec)
    assert back.manifest.labels == ("label_0", "label_1", "label_2")


def test_zip_with_one_wrapping_folder_is_flattened(env: Env) -> None:
    files = export_peft(random_artifact(env.spec, n_labels=3, seed=2), env.spec)
    data = make_zip({"my-adapter/": b""} | {f"my-adapter/{n}": d for n, d in files.items()})
    assert unzip_files(data, max_bytes=1 << 20) == files


@pytest.mark.parametrize("members, message", [
    ({"a/b/adapter_config.json": b"{}"}, "is nested; at most one wrapping folder"),
    ({"x/adapter_config.json": b"{}", "y/adapter_config.json": b"{}"}, "not a plain, unique file name"),
    ({"adapter_config.json": b"{}", "dir/adapter_config.json": b"{}"}, "not a plain, unique file name"),
    ({".hidden": b"x"}, "not a plain, unique file name"),
    ({"dir/..": b"x"}, "not a plain, unique file name"),
], ids=["two folders deep", "same name in two folders", "same name top and nested", "dotfile", "dot-dot"])
def test_zip_names_are_refused(members: dict[str, bytes], message: str) -> None:
    with pytest.raises(ArtifactError, match=message):
        unzip_files(make_zip(members), max_bytes=1 << 20)


def test_zip_with_too_many_members() -> None:
    data = make_zip({f"f{i}.txt": b"x" for i in range(17)})
    with pytest.raises(ArtifactError, match="zip holds 17 files; at most 16 allowed"):
        unzip_files(data, max_bytes=1 << 20)
    assert len(unzip_files(data, max_bytes=1 << 20, max_members=17)) == 17


def test_zip_bomb_is_refused_by_header_size_before_inflating() -> None:
    size = 50_000_000
    bomb = make_zip({"adapter_model.safetensors": bytes(size)})
    assert len(bomb) < 100_000  # 50 MB of zeros deflates to ~50 KB
    limit = 1 << 20
    with pytest.raises(ArtifactError, match=f"zip inflates to {size} bytes, over the {limit} byte limit"):
        unzip_files(bomb, max_bytes=limit)
    # Proof that nothing was inflated: with the deflate stream destroyed, the refusal is the same
    # size-limit one (inflating would have failed on the corrupt data instead).
    middle = len(bomb) // 2
    wrecked = bomb[:middle] + b"\xff" * 1000 + bomb[middle + 1000:]
    with pytest.raises(ArtifactError, match=f"zip inflates to {size} bytes"):
        unzip_files(wrecked, max_bytes=limit)
    # the limit is on the total, not per member
    with pytest.raises(ArtifactError, match="zip inflates to 1200000 bytes"):
        unzip_files(make_zip({"a": bytes(600_000), "b": bytes(600_000)}), max_bytes=limit)


def test_zip_whose_header_understates_the_size_is_refused() -> None:
    """A header claiming 100 bytes for 1 MB of data: reading stops at the claimed size, then refuses."""
    data = patch_central(make_zip({"adapter_model.safetensors": bytes(1 << 20)}), 24, "<I", 100)
    with pytest.raises(ArtifactError, match="zip member 'adapter_model.safetensors' cannot be read"):
        unzip_files(data, max_bytes=1000)


@pytest.mark.parametrize("case", ["overstated size", "bad crc", "corrupt deflate", "encrypted flag",
                                  "unknown compression"])
def test_zip_member_that_cannot_be_read_is_an_artifact_error(case: str) -> None:
    payload = bytes(range(256)) * 40
    data = make_zip({"adapter_config.json": payload})
    if case == "overstated size":
        data = patch_central(data, 24, "<I", len(payload) + 500)
    elif case == "bad crc":
        data = patch_central(data, 16, "<I", 0xDEADBEEF)
    elif case == "corrupt deflate":
        at = data.index(b"adapter_config.json") + len("adapter_config.json")  # start of the local data
        data = data[:at] + b"\xff" * 64 + data[at + 64:]
    elif case == "encrypted flag":
        data = patch_central(data, 8, "<H", 0x1)
    else:
        data = patch_central(data, 10, "<H", 99)
    message = {"overstated size": "does not have the size its header says", "bad crc": "Bad CRC-32",
               "encrypted flag": "encrypted", "unknown compression": "compression method is not supported"}
    with pytest.raises(ArtifactError, match=f"zip member 'adapter_config.json' .*{message.get(case, '')}") as e:
        unzip_files(data, max_bytes=1 << 20)
    assert type(e.value) is ArtifactError


@pytest.mark.parametrize("data", [
    b"", b"hello, not a zip", bytes(range(256)) * 4, b"PK\x03\x04" + bytes(100),
    make_zip({"adapter_config.json": b"{}" * 100})[:60],
], ids=["empty", "text", "random", "local header only", "truncated zip"])
def test_not_a_zip(data: bytes) -> None:
    with pytest.raises(ArtifactError, match="upload is not a zip archive"):
        unzip_files(data, max_bytes=1 << 20)


def test_unzip_only_inflates_the_named_members_and_still_checks_them_all() -> None:
    import io
    import zipfile

    from adapters.errors import ArtifactError
    from adapters.peft_format import unzip_files

    def zipped(members: dict[str, bytes]) -> bytes:
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
            for name, content in members.items():
                z.writestr(name, content)
        return buf.getvalue()

    data = zipped({"a.json": b"{}", "weights.bin": b"x" * 1000})
    assert unzip_files(data, max_bytes=2000, only=("a.json",)) == {"a.json": b"{}"}
    assert unzip_files(data, max_bytes=2000) == {"a.json": b"{}", "weights.bin": b"x" * 1000}
    with pytest.raises(ArtifactError, match="over the 500 byte limit"):  # sizes of unread members count
        unzip_files(data, max_bytes=500, only=("a.json",))
    with pytest.raises(ArtifactError, match="nested"):
        unzip_files(zipped({"a.json": b"{}", "x/y/w.bin": b"1"}), max_bytes=2000, only=("a.json",))
