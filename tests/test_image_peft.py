"""peft interchange for image adapters (issue 14 item 8): conv LoRA between peft's Conv2d layout
``[r, C_in, 1, 1]`` / ``[C_out, r, 1, 1]`` and the artifact's ``[r, C_in]`` / ``[C_out, r]``.

Our export loads into real peft and gives what the engine serves; an adapter saved by peft's
own ``save_pretrained`` imports and serves equal to peft (fp32, 1e-5); the probe refuses an
image adapter that overflows; another task's export is refused naming both tasks.
"""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as st_load
from torch import nn

from adapters.base import tiny_base
from adapters.catalog import Catalog
from adapters.errors import ArtifactError, TaskMismatchError
from adapters.import_checks import probe_logits
from adapters.peft_format import CONFIG_FILE, TAILOR_FILE, WEIGHTS_FILE, export_peft, import_peft
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact, random_image_artifact
from adapters.tasks import IMAGE_CLASSIFICATION
from adapters.vision.backbone import tiny_vision_base
from tests.test_vision_lora import images, max_diff


@pytest.fixture(scope="module")
def vision():
    """The vision engine's base, a pristine copy of its backbone (peft's), and the engine."""
    base = tiny_vision_base(seed=2)
    pristine = copy.deepcopy(base.model)
    return base, pristine


@pytest.fixture()
def engine(vision, tmp_path):
    base, _ = vision
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/registry.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    return Engine(base, catalog, EngineConfig(max_resident=8, device_slots=5, max_batch_size=4))


def with_head(pristine: nn.Module, n_labels: int) -> nn.Module:
    model = copy.deepcopy(pristine)
    model._fc = nn.Linear(pristine.get_submodule("_conv_head").out_channels, n_labels)
    return model


def serve(engine: Engine, artifact, x: torch.Tensor) -> torch.Tensor:
    record = engine.catalog.publish("acme", "photos", artifact, promote=True, spec=engine.base.spec)
    loaded = engine.acquire(engine.resolve("acme", f"photos@{record.version}"))
    return torch.stack(engine.forward(engine.serving.collate(list(x)), [loaded] * len(x)).logits)


def test_export_writes_peft_conv_layout_and_imports_back_exactly(vision):
    base, _ = vision
    art = random_image_artifact(base.spec, r=4, n_labels=3, seed=5)
    files = export_peft(art, base.spec)
    config = json.loads(files[CONFIG_FILE])
    assert config["task_type"] is None and config["modules_to_save"] == ["_fc"]
    tensors = st_load(files[WEIGHTS_FILE])
    for path, (a, b) in art.weights.lora.items():
        got_a = tensors[f"base_model.model.{path}.lora_A.weight"]
        got_b = tensors[f"base_model.model.{path}.lora_B.weight"]
        assert got_a.shape == (*a.shape, 1, 1) and got_b.shape == (*b.shape, 1, 1)
    back = import_peft(files, base.spec)
    assert back.manifest.kind == IMAGE_CLASSIFICATION and back.manifest.labels == art.manifest.labels
    assert set(back.weights.lora) == set(art.weights.lora)
    for path, (a, b) in art.weights.lora.items():
        assert torch.equal(back.weights.lora[path][0], a) and torch.equal(back.weights.lora[path][1], b)
    assert torch.equal(back.weights.head_weight, art.weights.head_weight)


def test_our_export_runs_in_peft_as_the_engine_serves_it(vision, engine, tmp_path):
    base, pristine = vision
    art = random_image_artifact(base.spec, r=3, n_labels=4, seed=6, std=0.3)
    for name, data in export_peft(art, base.spec).items():
        (tmp_path / name).write_bytes(data)
    reference = PeftModel.from_pretrained(with_head(pristine, 4), str(tmp_path)).eval()
    x = images(3, base.input_size, seed=6)
    with torch.inference_mode():
        want = reference(x)
        plain = reference.base_model.model._fc(pristine(x))
    assert max_diff(want, plain) > 1e-2  # the LoRA really was loaded by peft
    assert max_diff(serve(engine, art, x), want) <= 1e-5


def test_an_adapter_saved_by_peft_imports_and_serves_equal_to_peft(vision, engine, tmp_path):
    base, pristine = vision
    targets = [p for p in base.lora_paths if p.endswith(("_project_conv", "_conv_head"))]
    model = get_peft_model(with_head(pristine, 5), LoraConfig(
        r=6, lora_alpha=3, target_modules=targets, modules_to_save=["_fc"], lora_dropout=0.0))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoraLayer):
                for t in (m.lora_A["default"].weight, m.lora_B["default"].weight):
                    assert t.dim() == 4 and t.shape[2:] == (1, 1)  # peft's Conv2d LoRA
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
        head = model.base_model.model._fc.modules_to_save["default"]
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.2)
    model.save_pretrained(str(tmp_path / "peft"))
    files = {p.name: p.read_bytes() for p in (tmp_path / "peft").iterdir()}
    art = import_peft(files, base.spec, labels=["ant", "bee", "cat", "dog", "eel"])
    assert art.manifest.kind == IMAGE_CLASSIFICATION and art.rank == 6
    assert all(a.dim() == 2 for a, _ in art.weights.lora.values())
    x = images(4, base.input_size, seed=7)
    with torch.inference_mode():
        want = model.eval()(x)
    assert max_diff(serve(engine, art, x), want) <= 1e-5
    probe_logits(engine, art)  # finite on the image probe rows


def test_the_image_probe_refuses_an_adapter_that_overflows(vision, engine):
    base, _ = vision
    art = random_image_artifact(base.spec, seed=8)
    huge = {p: (torch.full_like(a, 1e30), torch.full_like(b, 1e30)) for p, (a, b) in art.weights.lora.items()}
    bad = dataclasses.replace(art, weights=dataclasses.replace(art.weights, lora=huge))
    with pytest.raises(ArtifactError, match="non-finite logits .* on probe input 1 of"):
        probe_logits(engine, bad)
    assert len(engine.slots) == 0  # the probe's slot is freed


def test_another_tasks_export_is_refused_naming_both(vision):
    base, _ = vision
    text = tiny_base(seed=1)
    files = export_peft(random_artifact(text.spec, seed=1), text.spec)
    with pytest.raises(TaskMismatchError, match="text-classification adapter, but the base serves image"):
        import_peft(files, base.spec)
    files.pop(TAILOR_FILE)  # a plain peft SEQ_CLS adapter: its task type is not an image one
    with pytest.raises(ArtifactError, match="only image-classification adapters without a task_type"):
        import_peft(files, base.spec)
