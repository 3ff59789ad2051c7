"""The frozen vision base and mixed-tenant LoRA on its 1x1 convolutions (issue 14, items 3-4).

A mixed batch through the wrapped backbone gives, row for row, what peft's Conv2d LoRA gives
for each adapter alone (fp32); base rows are the base model. The real EfficientNet-Lite0 is
only loaded by the tests marked slow.
"""

from __future__ import annotations

import copy
import json
import socket

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import save_file
from torch import nn

from adapters.artifact import AdapterManifest, LoraSettings
from adapters.runtime.context import use_plan
from adapters.runtime.head import MixedHead
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.lora_conv import MultiLoraConv1x1, wrap_convs
from adapters.runtime.slots import SlotBank
from adapters.vision.backbone import (
    VisionBase, bundled_weights_path, efficientnet_lite, load_vision_base, reclass_pointwise,
    tiny_efficientnet, tiny_vision_base,
)

ROWS = ["a", "b", None, "c", "a", "c", "b", None]  # adapter of each row; None: the base model


def images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def max_diff(x: torch.Tensor, y: torch.Tensor) -> float:
    return (x - y).abs().max().item()


def peft_adapter(
    base: VisionBase, pristine: nn.Module, name: str, *, r: int, alpha: float, targets: list[str],
    n_labels: int, seed: int,
) -> tuple[nn.Module, LoadedAdapter]:
    """A peft Conv2d-LoRA model with random non-zero A and B and its own head (the reference),
    and the same adapter as the engine holds it (weights read back from peft's modules)."""
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(pristine)
    head = nn.Linear(base.feature_dim, n_labels)
    with torch.no_grad():
        head.weight.copy_(torch.randn(n_labels, base.feature_dim, generator=g) * 0.2)
        head.bias.copy_(torch.randn(n_labels, generator=g) * 0.1)
    model._fc = head
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0))
    lora: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    scale = None
    for path, m in peft_model.base_model.model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # [r, C_in, 1, 1], [C_out, r, 1, 1]
        with torch.no_grad():
            a.copy_(torch.randn(a.shape, generator=g) * 0.3)
            b.copy_(torch.randn(b.shape, generator=g) * 0.3)
        lora[path] = (a.detach().flatten(1).clone(), b.detach().flatten(1).clone())
        scale = m.scaling["default"]
    assert sorted(lora) == sorted(targets) and scale is not None
    manifest = AdapterManifest(
        base_fingerprint=base.fingerprint, labels=tuple(f"{name}{i}" for i in range(n_labels)),
        lora=LoraSettings(r=r, alpha=alpha, target_modules=tuple(targets)), head_in_features=base.feature_dim,
        source="peft",
    )
    loaded = LoadedAdapter(key=VersionKey("t", name, 1, name), manifest=manifest, lora=lora, scale=scale,
                           head_weight=head.weight.detach().clone(), head_bias=head.bias.detach().clone())
    return peft_model.eval(), loaded


@pytest.fixture(scope="module")
def tiny():
    base = tiny_vision_base(seed=1)
    pristine = copy.deepcopy(base.model)  # the same frozen base, never wrapped
    paths = list(base.lora_paths)
    project = [p for p in paths if p.endswith("_project_conv")]
    expand_and_head = [p for p in paths if p.endswith("_expand_conv")] + ["_conv_head"]
    adapters = {
        "a": peft_adapter(base, pristine, "a", r=4, alpha=8, targets=paths, n_labels=3, seed=1),
        "b": peft_adapter(base, pristine, "b", r=8, alpha=4, targets=project, n_labels=5, seed=2),
        "c": peft_adapter(base, pristine, "c", r=2, alpha=2, targets=expand_and_head, n_labels=2, seed=3),
    }
    wrap_convs(base.model, paths)
    base.model._fc = MixedHead(base.feature_dim)
    # the text engine's own slot bank, keyed by conv path with shapes (C_in, C_out)
    bank = SlotBank(base.spec.linear_shapes, base.feature_dim, 5, base.device, base.dtype)
    return base, pristine, bank, adapters


def mixed(base: VisionBase, bank: SlotBank, x: torch.Tensor, rows: list[LoadedAdapter | None]):
    plan = bank.plan(rows)
    with torch.inference_mode(), use_plan(plan):
        logits = base.model(x)
    return logits, plan.features


def mixed_rows(tiny, seed: int, layout: torch.memory_format = torch.contiguous_format):
    """Images for ``ROWS`` and their mixed batch's logits and pooled features."""
    base, _, bank, adapters = tiny
    x = images(len(ROWS), base.input_size, seed=seed)
    rows = [None if n is None else adapters[n][1] for n in ROWS]
    return (x, *mixed(base, bank, x.contiguous(memory_format=layout), rows))


# -- (a) re-classing the pointwise convs is exact ------------------------------------------------


def test_reclass_is_exact_on_the_tiny_cnn():
    raw = tiny_efficientnet(seed=3)
    x = images(4, 32, seed=3)
    with torch.no_grad():
        want = raw(x)
    model = copy.deepcopy(raw)
    weight = model._blocks[1]._expand_conv.weight
    paths = reclass_pointwise(model)
    assert paths and all(type(model.get_submodule(p)) is nn.Conv2d for p in paths)
    assert all(p.endswith(("_expand_conv", "_project_conv", "_conv_head")) for p in paths)
    assert type(model._blocks[1]._depthwise_conv) is type(raw._blocks[1]._depthwise_conv)  # untouched
    assert model._blocks[1]._expand_conv.weight is weight  # the same tensors, not copies
    with torch.no_grad():
        assert max_diff(model(x), want) == 0.0
    assert reclass_pointwise(model) == paths  # idempotent


def test_tiny_vision_base_is_frozen_and_fingerprinted():
    base = tiny_vision_base(seed=0)
    assert not base.model.training and not any(p.requires_grad for p in base.model.parameters())
    assert base.spec.linear_shapes == {
        p: (base.model.get_submodule(p).in_channels, base.model.get_submodule(p).out_channels)
        for p in base.lora_paths
    }
    assert base.spec.head_in_features == base.feature_dim
    with torch.inference_mode():
        assert base.model(images(2, base.input_size)).shape == (2, base.feature_dim)
    assert tiny_vision_base(seed=0).fingerprint == base.fingerprint
    assert tiny_vision_base(seed=1).fingerprint != base.fingerprint


def test_tiny_base_statistics_are_calibrated_so_its_features_depend_on_the_input():
    """With random batch-norm statistics the pooled features were all but constant (their spread
    over 32 noise images ~4e-4 of their size) and nothing learned on them; calibrated: ~0.4."""
    base = tiny_vision_base(seed=0)
    x = torch.rand(32, 3, base.input_size, base.input_size, generator=torch.Generator().manual_seed(9)) * 2 - 1
    with torch.inference_mode():
        features = base.model(x)
    assert (features.std(0).mean() / features.abs().mean()).item() > 0.1
    norms = [m for m in base.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(m.momentum == pytest.approx(0.01) and not m.training for m in norms)  # as built
    assert all(m.running_mean.dtype == torch.float32 and bool(m.running_var.gt(0).all()) for m in norms)


def test_tiny_base_is_the_same_whatever_the_thread_count():
    """Serving and training processes build ``tiny:SEED`` with different thread counts: the
    calibration must give them one fingerprint, or no adapter could move between them."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = tiny_vision_base(seed=4)
        torch.set_num_threads(3)
        three = tiny_vision_base(seed=4)
    finally:
        torch.set_num_threads(threads)
    assert one.fingerprint == three.fingerprint
    assert all(torch.equal(a, b) for a, b in zip(one.model.state_dict().values(), three.model.state_dict().values()))


def test_input_sizes_must_be_multiples_of_the_stride():
    with pytest.raises(ValueError, match="multiple of 32"):
        efficientnet_lite(input_size=100)
    with pytest.raises(ValueError, match="multiple of 32"):
        load_vision_base(input_size=96.0)  # type: ignore[arg-type]


# -- (b), (c) mixed batches equal peft per adapter; base rows are the base ------------------------


def test_mixed_batch_matches_peft_solo(tiny):
    _, pristine, _, adapters = tiny
    x, logits, _ = mixed_rows(tiny, seed=5)
    for name, (ref, loaded) in adapters.items():
        with torch.inference_mode():
            want = ref(x)
            base_logits = ref.base_model.model._fc(pristine(x))
        assert max_diff(want, base_logits) > 1e-2  # the adapter really changes its outputs
        for row, row_name in enumerate(ROWS):
            if row_name == name:
                assert max_diff(logits[row, : loaded.n_labels], want[row]) <= 1e-5, (name, row)


def test_base_rows_are_the_base_model(tiny):
    base, pristine, _, _ = tiny
    x, _, features = mixed_rows(tiny, seed=6)
    with torch.inference_mode():
        want = pristine(x)
    for row, row_name in enumerate(ROWS):
        if row_name is None:
            assert max_diff(features[row], want[row]) <= 1e-6
        else:
            assert max_diff(features[row], want[row]) > 1e-3
    # outside a plan every wrapped conv is its base conv, bit for bit
    for wrapped in base.model.modules():
        if isinstance(wrapped, MultiLoraConv1x1):
            h = torch.randn(2, wrapped.in_channels, 3, 3)
            with torch.inference_mode():
                assert torch.equal(wrapped(h), wrapped.base_layer(h))


def test_single_adapter_batch_matches_peft(tiny):
    base, _, bank, adapters = tiny
    ref, loaded = adapters["b"]
    x = images(3, base.input_size, seed=7)
    logits, _ = mixed(base, bank, x, [loaded] * 3)
    with torch.inference_mode():
        assert max_diff(logits[:, : loaded.n_labels], ref(x)) <= 1e-5


def test_channels_last_activations_give_the_same_rows(tiny):
    _, want, _ = mixed_rows(tiny, seed=8)
    _, got, _ = mixed_rows(tiny, seed=8, layout=torch.channels_last)
    assert max_diff(got, want) <= 1e-5


def test_wrap_convs_takes_only_plain_pointwise_convs():
    raw = tiny_efficientnet(seed=0)
    with pytest.raises(TypeError, match="_blocks.1._expand_conv"):  # not re-classed yet
        wrap_convs(raw, ["_blocks.1._expand_conv"])
    paths = reclass_pointwise(raw)
    with pytest.raises(TypeError, match="_depthwise_conv"):
        wrap_convs(raw, ["_blocks.1._depthwise_conv"])
    first = wrap_convs(raw, paths)
    again = wrap_convs(raw, paths)
    assert all(first[p] is again[p] and raw.get_submodule(p) is first[p] for p in paths)


# -- checkpoint directories ---------------------------------------------------------------------


@pytest.mark.parametrize("config", [None, {"architecture": "resnet50"}, {"model_type": "vit"}])
def test_unsupported_checkpoint_directory_is_a_clear_error(tmp_path, config):
    if config is not None:
        (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.pth").write_bytes(b"not read")
    with pytest.raises(ValueError, match="resnet50" if config and "architecture" in config else "config.json"):
        load_vision_base(tmp_path)


def test_missing_checkpoint_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_vision_base(tmp_path / "absent")


def test_checkpoint_directory_of_the_supported_layout(tmp_path):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        state = efficientnet_lite(state=None).state_dict()
    state.pop("_fc.weight"), state.pop("_fc.bias")  # a headless checkpoint is fine too
    state["_fc.weight"], state["_fc.bias"] = torch.zeros(7, 1280), torch.zeros(7)  # or any classes
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "efficientnet-lite0"}))
    base = load_vision_base(tmp_path)
    assert base.feature_dim == 1280 and base.input_size == 224 and len(base.lora_paths) == 32
    state["_blocks.0._project_conv.weight"] = torch.zeros(3, 3, 1, 1)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="do not fit efficientnet-lite0"):
        load_vision_base(tmp_path)


# -- (a), (d) the real EfficientNet-Lite0, offline (slow) ----------------------------------------


@pytest.fixture(scope="module")
def package_model():
    """The package's own model with the bundled ImageNet weights, built without our code."""
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(torch.load(bundled_weights_path(), map_location="cpu", weights_only=True))
    return model.eval()


@pytest.mark.slow
def test_reclass_is_exact_on_the_real_backbone(package_model):
    model = copy.deepcopy(package_model)
    paths = reclass_pointwise(model)
    assert len(paths) == 32  # 1 project (block 0) + 15 x (expand, project) + the head conv
    x = images(2, 224, seed=1)
    with torch.no_grad():
        assert max_diff(model(x), package_model(x)) == 0.0


@pytest.mark.slow
def test_real_backbone_loads_offline_frozen_with_imagenet_features(package_model, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the vision base tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    base = load_vision_base(device="cpu")
    assert base.feature_dim == 1280 and base.input_size == 224 and base.dtype == torch.float32
    assert not base.model.training and not any(p.requires_grad for p in base.model.parameters())
    assert isinstance(base.model._fc, nn.Identity) and len(base.lora_paths) == 32
    assert base.fingerprint.startswith("sha256:") and base.fingerprint != tiny_vision_base().fingerprint
    x = images(2, 224, seed=2)
    with torch.inference_mode():
        features = base.model(x)
        want = package_model(x)  # ImageNet logits of the package's own model
        got = package_model._fc(features)  # its classifier on our features
    assert features.shape == (2, 1280)
    assert max_diff(got, want) <= 1e-5
    assert got.argmax(-1).tolist() == want.argmax(-1).tolist()


@pytest.mark.slow
def test_real_backbone_at_another_input_size_has_the_same_weights_and_paddings():
    """Built for 128 px the backbone is the 224 px one run on smaller images (its static "same"
    paddings are the same for every multiple of 32), with its own fingerprint."""
    small, full = load_vision_base(device="cpu", input_size=128), load_vision_base(device="cpu")
    assert small.input_size == 128 and small.fingerprint != full.fingerprint
    x = images(2, 128, seed=4)
    with torch.inference_mode():
        assert max_diff(small.model(x), full.model(x)) == 0.0


def test_a_setting_names_the_vision_base() -> None:
    from adapters.vision.backbone import vision_base_from_setting

    assert vision_base_from_setting("tiny:3").fingerprint == tiny_vision_base(3).fingerprint
    assert vision_base_from_setting("tiny").fingerprint == tiny_vision_base(0).fingerprint
    assert vision_base_from_setting("tiny:3").fingerprint != tiny_vision_base(4).fingerprint
    with pytest.raises(ValueError, match="'tiny:x'.*integer SEED"):
        vision_base_from_setting("tiny:x")
