"""Per-epoch training checkpoints: safetensors for tensors, JSON for the rest, never pickle.

A checkpoint is ``state.safetensors`` (trainable parameters, AdamW moments, the best epoch's
parameters) plus ``state.json`` (epoch, step, best score, history and a fingerprint of the
run's settings). Both are written to temporary names and renamed, the JSON last, so a crash
mid-write leaves the previous checkpoint intact. The tensor file's own metadata repeats the
JSON's fingerprint and epoch (and step, for a mid-epoch checkpoint): a crash between the two
renames leaves a pair that disagrees, which is ignored (train from scratch) rather than resumed
with another epoch's tensors. A checkpoint whose fingerprint does not match the run asking for
it is ignored too.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

STATE = "state.json"
TENSORS = "state.safetensors"


@dataclass
class Checkpoint:
    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]


def save(folder: Path, meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tmp_tensors = folder / f".{TENSORS}.tmp"
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp_tensors),
              metadata=_stamp(meta))
    _fsync(tmp_tensors)
    os.replace(tmp_tensors, folder / TENSORS)
    tmp_meta = folder / f".{STATE}.tmp"
    tmp_meta.write_text(json.dumps(meta))
    _fsync(tmp_meta)
    os.replace(tmp_meta, folder / STATE)


def load(folder: Path | None, fingerprint: str) -> Checkpoint | None:
    if folder is None or not (folder / STATE).exists() or not (folder / TENSORS).exists():
        return None
    try:
        meta = json.loads((folder / STATE).read_text())
        if not isinstance(meta, dict) or meta.get("fingerprint") != fingerprint:
            return None
        with safe_open(str(folder / TENSORS), framework="pt") as f:
            if (f.metadata() or {}) != _stamp(meta):
                return None  # the two files are from different epochs
        return Checkpoint(meta=meta, tensors=load_file(str(folder / TENSORS)))
    except (OSError, ValueError, SafetensorError):
        return None  # unreadable: train from scratch rather than fail the job


def _stamp(meta: dict[str, Any]) -> dict[str, str]:
    stamp = {"fingerprint": str(meta.get("fingerprint")), "epoch": str(meta.get("epoch"))}
    if "resume_at" in meta:  # a mid-epoch checkpoint: its step tells it from the epoch-end one
        stamp["step"] = str(meta.get("step"))
    return stamp


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())
