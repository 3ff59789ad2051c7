"""Interchange with peft's on-disk layout: ``adapter_config.json`` + ``adapter_model.safetensors``.

``export_peft`` writes what ``PeftModel.from_pretrained`` reads: a LoRA adapter whose
classification head is a ``modules_to_save`` module (text: ``SEQ_CLS``; images: a plain
``PeftModel`` over the vision backbone with its ``_fc`` head, LoRA factors in peft's Conv2d
layout ``[r, C_in, 1, 1]`` / ``[C_out, r, 1, 1]``: the task's ``peft_task_type`` and
``lora_kernel``), plus ``tailor_manifest.json`` with the label names, metrics and pooling peft
has no place for (plain peft reads the model's own pooled output: an adapter trained on another
pooling reproduces only when imported back here). A head-less adapter (text generation:
``CAUSAL_LM``) has no ``modules_to_save`` and no head tensors either way.
``import_peft`` takes such files -- written by us or by anyone's peft training -- and returns a
checked ``AdapterArtifact`` of the base's task for a given base (a Tailor export of another task
is a ``TaskMismatchError`` naming both; conv factors are stored without their 1x1 kernel
dimensions). Only plain LoRA is accepted: DoRA, bias training and fan-in-fan-out layouts are
refused with a message naming the field; per-module rank/alpha patterns are folded into ``B``.
Imports meet the bar training sets (``adapters.import_checks``): label names follow the dataset
rules, listed ``target_modules`` must name linear layers of the base.
``zip_files``/``unzip_files`` pack them for HTTP with limits on member count, names and inflated
size (no zip bombs, no paths).
"""

from __future__ import annotations

import io
import json
import re
import zipfile
import zlib
from collections.abc import Collection
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters.artifact import (
    MAX_RANK, AdapterArtifact, AdapterManifest, AdapterWeights, LoraSettings, check_tensor,
)
from adapters.datasets import DatasetLimits
from adapters.errors import ArtifactError, TaskMismatchError
from adapters.fingerprint import BaseSpec
from adapters.import_checks import ARTIFACT_LABEL_LIMITS, check_target_modules, clean_labels
from adapters.pooling import POOLER
from adapters.tasks import HEADLESS_TASKS, get_task, manifest_value

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
TAILOR_FILE = "tailor_manifest.json"
_PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"base_model\.model\.([A-Za-z0-9_.]+)\.lora_(A|B)\.weight")
MAX_TARGETS = 256  # names in target_modules (a base has a few dozen distinct ones)
_REFUSED = {  # field -> value that we can honour
    "use_dora": False, "fan_in_fan_out": False, "bias": "none", "lora_bias": False,
    "layers_to_transform": None, "target_parameters": None,
}


def export_peft(artifact: AdapterArtifact, spec: BaseSpec) -> dict[str, bytes]:
    m, w = artifact.manifest, artifact.weights
    kind = get_task(m.kind)
    targets = sorted(m.lora.target_modules)
    if not all(any(p == t or p.endswith("." + t) for t in targets) for p in w.lora):
        targets = sorted(w.lora)  # the manifest's names miss a module: peft would drop its weights
    config: dict[str, Any] = {
        "peft_type": "LORA", "task_type": kind.peft_task_type, "r": m.lora.r, "lora_alpha": m.lora.alpha,
        "lora_dropout": m.lora.dropout, "use_rslora": m.lora.use_rslora,
        "target_modules": targets, "modules_to_save": None if w.headless else [spec.head_name],
        "bias": "none", "fan_in_fan_out": False, "use_dora": False, "init_lora_weights": True,
        "inference_mode": True, "base_model_name_or_path": spec.name or None,
        "rank_pattern": {}, "alpha_pattern": {},
    }
    rank_pattern = {p: a.shape[0] for p, (a, _) in w.lora.items() if a.shape[0] != m.lora.r}
    if rank_pattern:
        # We apply one scale (alpha / r) to every module; peft scales each by its own
        # alpha_p / r_p, so give each odd-rank module the alpha that keeps the scale equal.
        config["rank_pattern"] = rank_pattern
        config["alpha_pattern"] = {
            p: m.lora.alpha * (rp / m.lora.r if not m.lora.use_rslora else (rp / m.lora.r) ** 0.5)
            for p, rp in rank_pattern.items()
        }
    tensors = {} if w.headless else {f"{_PREFIX}{spec.head_name}.weight": w.head_weight.contiguous(),
                                     f"{_PREFIX}{spec.head_name}.bias": w.head_bias.contiguous()}
    for path, (a, b) in w.lora.items():
        tensors[f"{_PREFIX}{path}.lora_A.weight"] = a.reshape(*a.shape, *kind.lora_kernel).contiguous()
        tensors[f"{_PREFIX}{path}.lora_B.weight"] = b.reshape(*b.shape, *kind.lora_kernel).contiguous()
    return {
        CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True).encode(),
        WEIGHTS_FILE: st_save({k: v.detach().cpu() for k, v in tensors.items()}),
        TAILOR_FILE: m.to_json(),
    }


def import_peft(
    files: dict[str, bytes], spec: BaseSpec, *, labels: list[str] | None = None,
    metrics: dict[str, Any] | None = None, limits: DatasetLimits | None = None,
) -> AdapterArtifact:
    """Build a checked artifact for ``spec`` from peft files (labels: given > tailor file > LABEL_i).

    Label names pass the dataset rules (``import_checks.clean_labels``; ``limits``: the tenant's,
    else the artifact format's bounds) and listed ``target_modules`` must name linear layers of
    the base (``import_checks.check_target_modules``). Whether the weights give finite logits is
    ``import_checks.probe_logits``'s question: it needs the engine."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise ArtifactError(f"peft adapter lacks {name}")
    try:
        config = json.loads(files[CONFIG_FILE].decode("utf-8"))
    except (ValueError, RecursionError) as e:  # bad UTF-8/JSON, huge ints, deep nesting
        raise ArtifactError(f"{CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ArtifactError(f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise ArtifactError(f"only LoRA adapters are supported, got peft_type {config.get('peft_type')!r}")
    kind = get_task(spec.task)
    tailor = _tailor_manifest(files.get(TAILOR_FILE))
    if tailor is not None and tailor.kind != kind.name:
        raise TaskMismatchError(f"{TAILOR_FILE}: this is a {tailor.kind} adapter, but the base serves {kind.name}",
                                param="file")
    if config.get("task_type") not in (kind.peft_task_type, None):
        wanted = (f"{kind.peft_task_type} adapters" if kind.peft_task_type
                  else f"{kind.name} adapters without a task_type (a plain PeftModel)")
        raise ArtifactError(f"only {wanted} are supported, got task_type {config.get('task_type')!r}")
    for field, ok in _REFUSED.items():
        if config.get(field, ok) != ok:
            raise ArtifactError(f"{CONFIG_FILE}: {field}={config.get(field)!r} is not supported")
    try:
        r, alpha = int(config["r"]), float(config["lora_alpha"])
    except (KeyError, TypeError, ValueError, OverflowError):
        raise ArtifactError(f"{CONFIG_FILE} needs numeric 'r' and 'lora_alpha'") from None
    use_rslora = bool(config.get("use_rslora", False))
    alpha_pattern = config.get("alpha_pattern") or {}
    if not isinstance(alpha_pattern, dict):
        raise ArtifactError(f"{CONFIG_FILE}: alpha_pattern must be an object")

    try:
        tensors = st_load(files[WEIGHTS_FILE])
    except (SafetensorError, ValueError, RuntimeError, KeyError) as e:  # KeyError: dtype torch lacks
        raise ArtifactError(f"{WEIGHTS_FILE} is not a valid safetensors file: {e}") from None
    for key, t in tensors.items():
        check_tensor(key, t)
    headless = kind.name in HEADLESS_TASKS
    if headless and labels:
        raise ArtifactError(f"a {kind.name} adapter has no labels", param="labels")
    if headless:  # LoRA alone: a head tensor is refused below as an unexpected tensor
        head_w, head_b = torch.zeros(0, 0), torch.zeros(0)
    else:
        head_w = tensors.pop(f"{_PREFIX}{spec.head_name}.weight", None)
        head_b = tensors.pop(f"{_PREFIX}{spec.head_name}.bias", None)
    if head_w is None or head_b is None:
        raise ArtifactError(
            f"peft adapter has no classification head: expected {spec.head_name!r} in modules_to_save"
        )
    if head_w.dim() != 2 or head_b.dim() != 1:
        raise ArtifactError(
            f"classification head has shapes {list(head_w.shape)} / {list(head_b.shape)}; "
            "expected [labels, features] / [labels]"
        )
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            raise ArtifactError(f"unexpected tensor {key!r} in {WEIGHTS_FILE}")
        parts.setdefault(m.group(1), {})[m.group(2)] = t
    lora = {}
    for path, ab in parts.items():
        if set(ab) != {"A", "B"}:
            raise ArtifactError(f"module {path!r} needs both lora_A and lora_B")
        lora[path] = (_unkernel(ab["A"], kind.lora_kernel), _unkernel(ab["B"], kind.lora_kernel))
    # peft scales each module by its own alpha_p / r_p (rank_pattern, alpha_pattern); we keep one
    # scale per adapter, so fold the ratio into B wherever a module's scale differs.
    if not 1 <= r <= MAX_RANK or not alpha > 0:
        raise ArtifactError(f"{CONFIG_FILE}: r must be in 1..{MAX_RANK} and lora_alpha positive")
    base_scale = alpha / (r**0.5 if use_rslora else r)
    for path, (a, b) in list(lora.items()):
        rp = a.shape[0] if a.dim() == 2 else 0
        if rp < 1:
            continue  # not a rank-r pair: artifact.validate() below refuses it with a message
        try:
            alpha_p = float(_pattern_value(alpha_pattern, path, alpha))
        except (TypeError, ValueError):
            raise ArtifactError(f"{CONFIG_FILE}: alpha_pattern value for {path!r} is not a number") from None
        scale_p = alpha_p / (rp**0.5 if use_rslora else rp)
        if scale_p != base_scale:
            lora[path] = (a, b * (scale_p / base_scale))

    n = head_w.shape[0]
    names = [] if headless else clean_labels(
        labels or (list(tailor.labels) if tailor else [f"LABEL_{i}" for i in range(n)]),
        limits or ARTIFACT_LABEL_LIMITS)
    if len(names) != n:
        raise ArtifactError(f"{len(names)} label names given for a head with {n} outputs")
    manifest = AdapterManifest(
        base_fingerprint=spec.fingerprint, labels=tuple(names),
        lora=LoraSettings(r=r, alpha=alpha, target_modules=_targets(config, lora, spec),
                          dropout=float(config.get("lora_dropout") or 0.0), use_rslora=use_rslora),
        head_in_features=head_w.shape[1],
        metrics=metrics if metrics is not None else (dict(tailor.metrics) if tailor else {}),
        source="peft", pooling=tailor.pooling if tailor else POOLER, task=manifest_value(kind.name),
    )
    artifact = AdapterArtifact(manifest=manifest,
                               weights=AdapterWeights(lora=lora, head_weight=head_w, head_bias=head_b))
    artifact.validate()
    artifact.check_base(spec)
    return artifact


def _unkernel(t: torch.Tensor, kernel: tuple[int, ...]) -> torch.Tensor:
    """A LoRA factor without the task's trailing kernel dimensions (peft's Conv2d ``[.., .., 1, 1]``);
    any other shape is left for ``AdapterArtifact.validate`` to refuse with a message."""
    if kernel and t.dim() == 2 + len(kernel) and tuple(t.shape[2:]) == kernel:
        return t.reshape(t.shape[0], t.shape[1])
    return t


def _pattern_value(pattern: dict[str, Any], path: str, default: float) -> float:
    for key, value in pattern.items():
        if path == key or path.endswith("." + key):
            return value
    return default


def _targets(config: dict[str, Any], lora: dict[str, Any], spec: BaseSpec) -> tuple[str, ...]:
    """The listed target modules, each checked against the base; a regex string (or nothing) is
    replaced by the names of the modules the weights adapt."""
    t = config.get("target_modules")
    if isinstance(t, list) and t:
        if len(t) > MAX_TARGETS:
            raise ArtifactError(f"{CONFIG_FILE}: target_modules lists {len(t)} names; at most {MAX_TARGETS}",
                                param="target_modules")
        check_target_modules(spec, t, param="target_modules")
        return tuple(sorted(set(t)))
    if t is not None and not isinstance(t, (str, list)):
        raise ArtifactError(f"{CONFIG_FILE}: target_modules must be a list of module names", param="target_modules")
    return tuple(sorted({p.rsplit(".", 1)[-1] for p in lora}))


def _tailor_manifest(data: bytes | None) -> AdapterManifest | None:
    if data is None:
        return None
    return AdapterManifest.from_json(data)


def zip_files(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for name in sorted(files):
            z.writestr(name, files[name])
    return buf.getvalue()


def unzip_files(data: bytes, *, max_bytes: int, max_members: int = 16,
                only: Collection[str] | None = None) -> dict[str, bytes]:
    """Read a flat zip of small files; refuses paths, too many members and oversized content.
    ``only``: inflate just these members (every check still runs on all of them)."""
    try:
        z = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise ArtifactError("upload is not a zip archive") from None
    infos = [i for i in z.infolist() if not i.is_dir()]
    if len(infos) > max_members:
        raise ArtifactError(f"zip holds {len(infos)} files; at most {max_members} allowed")
    total = sum(i.file_size for i in infos)
    if total > max_bytes:
        raise ArtifactError(f"zip inflates to {total} bytes, over the {max_bytes} byte limit")
    out: dict[str, bytes] = {}
    for info in infos:
        if info.filename.strip("/").count("/") > 1:
            raise ArtifactError(f"zip member {info.filename!r} is nested; at most one wrapping folder allowed")
        name = info.filename.rsplit("/", 1)[-1]  # accept a single wrapping folder
        if name in out or not name or name.startswith("."):
            raise ArtifactError(f"zip member {info.filename!r} is not a plain, unique file name")
        if only is not None and name not in only:
            out[name] = b""  # seen (names stay unique), not inflated
            continue
        try:
            with z.open(info) as f:
                content = f.read(info.file_size + 1)
        except (zipfile.BadZipFile, zlib.error, EOFError, RuntimeError, NotImplementedError, ValueError) as e:
            # corrupt data, bad CRC, sizes that lie, encryption, unknown compression
            raise ArtifactError(f"zip member {info.filename!r} cannot be read: {e}") from None
        if len(content) != info.file_size:
            raise ArtifactError(f"zip member {info.filename!r} does not have the size its header says")
        out[name] = content
    return out if only is None else {k: v for k, v in out.items() if k in only}
