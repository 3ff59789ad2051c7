"""How a classification head's features are pooled from the base model's token states.

Contract:

* ``Pooling(mode, normalize)``. ``mode``: ``pooler`` -- the model's own pooled output (for BERT
  its pooler over ``[CLS]``, what Hugging Face's ``*ForSequenceClassification`` heads read; how
  every adapter published before pooling was recorded is served); ``cls`` -- the last hidden
  state of the first token; ``mean`` / ``max`` -- mean / max over the tokens the attention mask
  keeps; ``mean_sqrt_len`` -- their sum over the square root of their count. ``normalize``:
  scale each row to unit L2 norm afterwards (sentence-transformers' ``Normalize`` module).
  ``POOLER`` (the default) is the model's own behaviour, unchanged.
* ``read_pooling(model_dir)``: the pooling a sentence-transformers layout declares
  (``modules.json``, its ``Pooling`` module's ``config.json``, a ``Normalize`` module), or
  ``POOLER`` where there is none. A layout we cannot reproduce exactly (several modes
  concatenated, weighted-mean or last-token pooling, a ``Dense`` module after pooling) gives
  ``POOLER``, with the reason logged: a base always loads.
* ``tap_tokens(model, sink)``: a forward hook on the model's backbone that hands ``sink`` the
  last hidden state ``[B, T, H]`` and attention mask ``[B, T]`` of every call.
* ``attach(model, head_name, pooling)``: the same forward, but the head reads ``pooling``'s
  features (through the model's own classifier dropout, which is the identity in eval mode).
  The head's input is replaced only right after the backbone ran in the same forward call, so
  calling the head directly on precomputed features is unchanged. The trainer uses this; the
  engine does the per-row version (``apply_rows``) in its mixed head, so an adapter is served
  with exactly the features it was trained on.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

MODES = ("pooler", "cls", "mean", "max", "mean_sqrt_len")
# sentence-transformers' Pooling config keys for the modes we reproduce, and those we do not
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ST_PASSIVE = ("Transformer", "Pooling", "Normalize")  # modules.json types we understand
log = logging.getLogger(__name__)

Sink = Callable[[torch.Tensor, torch.Tensor], None]


@dataclass(frozen=True)
class Pooling:
    mode: str = "pooler"
    normalize: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown pooling mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(self.normalize, bool):
            raise ValueError("pooling normalize must be true or false")

    @property
    def uses_tokens(self) -> bool:
        """Whether it needs the token states (anything but the model's own pooled output)."""
        return self.mode != "pooler"

    def __str__(self) -> str:
        return self.mode + ("+normalize" if self.normalize else "")

    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "normalize": self.normalize}

    @classmethod
    def from_dict(cls, d: Any) -> Pooling:
        if not isinstance(d, dict) or set(d) - {"mode", "normalize"}:
            raise ValueError("pooling must be an object with 'mode' and 'normalize'")
        return cls(mode=d.get("mode", "pooler"), normalize=d.get("normalize", False))

    @classmethod
    def parse(cls, text: str) -> Pooling:
        """``"mean"``, ``"mean+normalize"``, ... (what ``str`` gives)."""
        mode, _, extra = text.partition("+")
        if extra not in ("", "normalize"):
            raise ValueError(f"pooling {text!r}: only '+normalize' may follow the mode")
        return cls(mode=mode, normalize=extra == "normalize")


POOLER = Pooling()


def pool_tokens(mode: str, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, T, H]`` token states -> ``[B, H]`` under ``mask`` (computed in fp32)."""
    if mode == "cls":
        return hidden[:, 0]
    h = hidden.float()
    m = mask.to(h.dtype).unsqueeze(-1)
    if mode == "max":
        return h.masked_fill(m == 0, -1e9).max(dim=1).values.to(hidden.dtype)
    total, count = (h * m).sum(dim=1), m.sum(dim=1).clamp(min=1e-9)
    if mode == "mean":
        return (total / count).to(hidden.dtype)
    if mode == "mean_sqrt_len":
        return (total / count.sqrt()).to(hidden.dtype)
    raise ValueError(f"pooling mode {mode!r} does not pool tokens")


def apply(pooling: Pooling, pooled: torch.Tensor, hidden: torch.Tensor | None,
          mask: torch.Tensor | None) -> torch.Tensor:
    """Every row's features under one pooling (``pooled``: the model's own pooled output)."""
    if pooling.uses_tokens:
        if hidden is None or mask is None:
            raise RuntimeError(f"pooling {pooling} needs the token states, which this forward did not keep")
        out = pool_tokens(pooling.mode, hidden, mask)
    else:
        out = pooled
    return F.normalize(out.float(), p=2, dim=-1).to(out.dtype) if pooling.normalize else out


def apply_rows(poolings: tuple[Pooling, ...], pooled: torch.Tensor, hidden: torch.Tensor | None,
               mask: torch.Tensor | None) -> torch.Tensor:
    """Each row's features under its own pooling; each kind present is computed once, on its rows."""
    kinds = set(poolings)
    if len(kinds) == 1:
        return apply(poolings[0], pooled, hidden, mask)
    out = pooled.clone()
    for kind in kinds - {POOLER}:
        idx = torch.tensor([i for i, p in enumerate(poolings) if p == kind], device=pooled.device)
        sub = apply(kind, pooled.index_select(0, idx), None if hidden is None else hidden.index_select(0, idx),
                    None if mask is None else mask.index_select(0, idx))
        out.index_copy_(0, idx, sub.to(out.dtype))
    return out


# -- reading a sentence-transformers layout ---------------------------------------------------

def read_pooling(model_dir: Path) -> Pooling:
    """The pooling ``model_dir``'s sentence-transformers configuration declares, else ``POOLER``."""
    modules_file = Path(model_dir) / "modules.json"
    if not modules_file.is_file():
        return POOLER
    try:
        modules = json.loads(modules_file.read_text(encoding="utf-8"))
        types = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
        pool_entry = next((m for m in modules if str(m["type"]).endswith(".Pooling")), None)
        config = {} if pool_entry is None else json.loads(
            (Path(model_dir) / str(pool_entry["path"]) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return _fallback(model_dir, f"its modules.json or pooling config cannot be read ({e})")
    if pool_entry is None:
        return POOLER
    others = sorted(set(types) - set(_ST_PASSIVE))
    if others:
        return _fallback(model_dir, f"modules.json has modules we do not apply: {', '.join(others)}")
    if any(config.get(k) for k in _ST_UNSUPPORTED):
        return _fallback(model_dir, "its pooling mode (weighted mean or last token) is not supported")
    modes = [mode for key, mode in _ST_MODES.items() if config.get(key)]
    if len(modes) != 1:
        return _fallback(model_dir, f"its pooling config names {len(modes)} modes; one is supported")
    return Pooling(mode=modes[0], normalize="Normalize" in types)


def _fallback(model_dir: Path, why: str) -> Pooling:
    log.warning("base model %s: using the model's own pooled output: %s", model_dir, why)
    return POOLER


# -- hooks ------------------------------------------------------------------------------------

def backbone(model: nn.Module) -> nn.Module | None:
    """The encoder under a Hugging Face ``*ForSequenceClassification`` model (``base_model``)."""
    prefix = getattr(model, "base_model_prefix", "")
    inner = getattr(model, prefix, None) if prefix else None
    return inner if isinstance(inner, nn.Module) and inner is not model else None


def tap_tokens(model: nn.Module, sink: Sink) -> torch.utils.hooks.RemovableHandle:
    """Hand ``sink(last_hidden_state, attention_mask)`` every backbone output of ``model``."""
    inner = backbone(model)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no backbone whose token states could be pooled")

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = output[0]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        sink(hidden, mask)

    return inner.register_forward_hook(hook, with_kwargs=True)


def attach(model: nn.Module, head_name: str, pooling: Pooling) -> None:
    """Make ``model``'s head read ``pooling``'s features (nothing to do for ``POOLER``)."""
    if pooling == POOLER:
        return
    kept: list[tuple[torch.Tensor, torch.Tensor]] = []
    drop = getattr(model, "dropout", None)
    drop = drop if isinstance(drop, nn.Dropout) else None

    def keep(hidden: torch.Tensor, mask: torch.Tensor) -> None:
        kept[:] = [(hidden, mask)]

    def replace(head: nn.Module, args: tuple) -> tuple | None:
        if not kept:  # the head called on its own (precomputed features): leave it alone
            return None
        hidden, mask = kept.pop()
        if hidden.shape[0] != args[0].shape[0]:
            raise RuntimeError("pooling: the head's batch is not the backbone's")
        feats = apply(pooling, args[0], hidden, mask)
        return (drop(feats) if drop is not None else feats, *args[1:])

    tap_tokens(model, keep)
    getattr(model, head_name).register_forward_pre_hook(replace)


def features_width_ok(model: nn.Module, head_in_features: int) -> bool:
    """Whether token states can feed a head of ``head_in_features`` (backbone found, same width)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return backbone(model) is not None and hidden == head_in_features
