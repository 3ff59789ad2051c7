"""How a classification head's features are pooled from the base model's token states.

Contract:

* ``Pooling(mode, normalize)``. ``mode``: ``pooler`` -- the model's own pooled output (for BERT
  its pooler over ``[CLS]``, what Hugging Face's ``*ForSequenceClassification`` heads read; how
  every adapter published before pooling was recorded is served); ``cls`` -- the last hidden
  state of the first token; ``mean`` / ``max`` -- mean / max over the tokens the attention mask
  keeps; ``mean_sqrt_len`` -- their sum over the square root of their count. ``normalize``:
  scale each row to unit L2 norm afterwards (sentence-transformers' ``Normalize`` module).
  ``layers``: ``"last"`` -- the token states are the backbone's last hidden state; ``"all"`` --
  they are the mean of every transformer block's output (``blocks``), which keeps the lower
  layers' lexical features a linear head on frozen features needs (see ``head_pooling``
  in ``adapters.training.text_task``); token modes only. ``POOLER`` (the default) is the model's
  own behaviour, unchanged. ``to_dict`` names ``layers`` only when it is not ``"last"``, so
  manifests and fingerprints written before the field existed read the same.
* ``read_pooling(model_dir)``: the pooling a sentence-transformers layout declares
  (``modules.json``, its ``Pooling`` module's ``config.json``, a ``Normalize`` module), or
  ``POOLER`` where there is none. A layout we cannot reproduce exactly (several modes
  concatenated, weighted-mean or last-token pooling, a ``Dense`` module after pooling) gives
  ``POOLER``, with the reason logged: a base always loads.
* ``tap_tokens(model, sink, all_layers=)``: a forward hook on the model's backbone that hands
  ``sink`` the last hidden state ``[B, T, H]``, the attention mask ``[B, T]`` and, when
  ``all_layers()`` says so for this call, the mean of the blocks' outputs ``[B, T, H]`` (else
  None: summing them costs a pass over every block's output, so it is done only on demand).
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
LAYERS = ("last", "all")
# sentence-transformers' Pooling config keys for the modes we reproduce, and those we do not
_ST_MODES = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean",
             "pooling_mode_max_tokens": "max", "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len"}
_ST_UNSUPPORTED = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_ST_PASSIVE = ("Transformer", "Pooling", "Normalize")  # modules.json types we understand
log = logging.getLogger(__name__)

Sink = Callable[[torch.Tensor, torch.Tensor, 'torch.Tensor | None'], None]


@dataclass(frozen=True)
class Pooling:
    mode: str = "pooler"
    normalize: bool = False
    layers: str = "last"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown pooling mode {self.mode!r}; use one of {', '.join(MODES)}")
        if not isinstance(self.normalize, bool):
            raise ValueError("pooling normalize must be true or false")
        if self.layers not in LAYERS:
            raise ValueError(f"unknown pooling layers {self.layers!r}; use one of {', '.join(LAYERS)}")
        if self.layers != "last" and not self.uses_tokens:
            raise ValueError("pooling over all layers needs a token mode (cls, mean, max, mean_sqrt_len)")

    @property
    def all_layers(self) -> bool:
        """Whether it pools the mean of every block's output rather than the last hidden state."""
        return self.layers == "all"

    @property
    def uses_tokens(self) -> bool:
        """Whether it needs the token states (anything but the model's own pooled output)."""
        return self.mode != "pooler"

    def __str__(self) -> str:
        return self.mode + ("+all_layers" if self.all_layers else "") + ("+normalize" if self.normalize else "")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode, "normalize": self.normalize}
        if self.layers != "last":
            d["layers"] = self.layers
        return d

    @classmethod
    def from_dict(cls, d: Any) -> Pooling:
        if not isinstance(d, dict) or set(d) - {"mode", "normalize", "layers"}:
            raise ValueError("pooling must be an object with 'mode', 'normalize' and optionally 'layers'")
        return cls(mode=d.get("mode", "pooler"), normalize=d.get("normalize", False), layers=d.get("layers", "last"))

    @classmethod
    def parse(cls, text: str) -> Pooling:
        """``"mean"``, ``"mean+normalize"``, ``"mean+all_layers+normalize"`` (what ``str`` gives)."""
        mode, *extras = text.split("+")
        unknown = sorted(set(extras) - {"normalize", "all_layers"})
        if unknown or len(set(extras)) != len(extras):
            raise ValueError(f"pooling {text!r}: only '+all_layers' and '+normalize' may follow the mode")
        return cls(mode=mode, normalize="normalize" in extras, layers="all" if "all_layers" in extras else "last")


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
          mask: torch.Tensor | None, layers_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Every row's features under one pooling (``pooled``: the model's own pooled output;
    ``layers_mean``: the mean of the blocks' outputs, for ``layers="all"``)."""
    if pooling.uses_tokens:
        states = layers_mean if pooling.all_layers else hidden
        if states is None or mask is None:
            what = "every layer's token states" if pooling.all_layers else "the token states"
            raise RuntimeError(f"pooling {pooling} needs {what}, which this forward did not keep")
        out = pool_tokens(pooling.mode, states, mask)
    else:
        out = pooled
    return F.normalize(out.float(), p=2, dim=-1).to(out.dtype) if pooling.normalize else out


def apply_rows(poolings: tuple[Pooling, ...], pooled: torch.Tensor, hidden: torch.Tensor | None,
               mask: torch.Tensor | None, layers_mean: torch.Tensor | None = None) -> torch.Tensor:
    """Each row's features under its own pooling; each kind present is computed once, on its rows."""
    kinds = set(poolings)
    if len(kinds) == 1:
        return apply(poolings[0], pooled, hidden, mask, layers_mean)
    out = pooled.clone()

    def rows(t: torch.Tensor | None, idx: torch.Tensor) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, idx)

    for kind in kinds - {POOLER}:
        idx = torch.tensor([i for i, p in enumerate(poolings) if p == kind], device=pooled.device)
        sub = apply(kind, pooled.index_select(0, idx), rows(hidden, idx), rows(mask, idx), rows(layers_mean, idx))
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


def blocks(model: nn.Module) -> nn.ModuleList | None:
    """The transformer blocks of ``model``'s backbone, in order (the first ``nn.ModuleList`` under
    it as long as ``config.num_hidden_layers``; BERT's ``encoder.layer``), or None."""
    inner = backbone(model)
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    if inner is None or not isinstance(n, int):
        return None
    return next((m for m in inner.modules() if isinstance(m, nn.ModuleList) and len(m) == n), None)


def tap_tokens(model: nn.Module, sink: Sink,
               all_layers: Callable[[], bool] = lambda: False) -> list[torch.utils.hooks.RemovableHandle]:
    """Hand ``sink(last_hidden_state, attention_mask, layers_mean)`` every backbone output of
    ``model``; ``layers_mean`` (the mean of the blocks' outputs) is None unless ``all_layers()``
    was true when the backbone started. Returns the hooks' handles."""
    inner = backbone(model)
    if inner is None:
        raise ValueError(f"{type(model).__name__} has no backbone whose token states could be pooled")
    stack = blocks(model)
    # this call's: whether the blocks' mean is wanted, their running sum, how many went in
    acc: dict[str, Any] = {"want": False, "total": None, "n": 0}

    def start(module: nn.Module, args: tuple, kwargs: dict) -> None:
        acc.update(want=stack is not None and all_layers(), total=None, n=0)

    def add(module: nn.Module, args: tuple, output: Any) -> None:
        if acc["want"]:
            out = (output[0] if isinstance(output, (tuple, list)) else output).float()
            acc["total"] = out if acc["total"] is None else acc["total"] + out  # out of place: outputs untouched
            acc["n"] += 1

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = output[0]
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:
            mask = args[1]
        if mask is None:
            mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device)
        total, n = acc["total"], acc["n"]
        acc.update(want=False, total=None, n=0)
        sink(hidden, mask, None if total is None else (total / n).to(hidden.dtype))

    handles = [inner.register_forward_pre_hook(start, with_kwargs=True)]
    handles += [block.register_forward_hook(add) for block in (stack or ())]
    handles.append(inner.register_forward_hook(hook, with_kwargs=True))
    return handles


def attach(model: nn.Module, head_name: str, pooling: Pooling) -> None:
    """Make ``model``'s head read ``pooling``'s features (nothing to do for ``POOLER``)."""
    if pooling == POOLER:
        return
    if pooling.all_layers and blocks(model) is None:
        raise ValueError(f"pooling {pooling}: {type(model).__name__} has no transformer blocks to average")
    kept: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = []
    drop = getattr(model, "dropout", None)
    drop = drop if isinstance(drop, nn.Dropout) else None

    def keep(hidden: torch.Tensor, mask: torch.Tensor, layers_mean: torch.Tensor | None) -> None:
        kept[:] = [(hidden, mask, layers_mean)]

    def replace(head: nn.Module, args: tuple) -> tuple | None:
        if not kept:  # the head called on its own (precomputed features): leave it alone
            return None
        hidden, mask, layers_mean = kept.pop()
        if hidden.shape[0] != args[0].shape[0]:
            raise RuntimeError("pooling: the head's batch is not the backbone's")
        feats = apply(pooling, args[0], hidden, mask, layers_mean)
        return (drop(feats) if drop is not None else feats, *args[1:])

    tap_tokens(model, keep, lambda: pooling.all_layers)
    getattr(model, head_name).register_forward_pre_hook(replace)


def features_width_ok(model: nn.Module, head_in_features: int) -> bool:
    """Whether token states can feed a head of ``head_in_features`` (backbone found, same width)."""
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    return backbone(model) is not None and hidden == head_in_features
