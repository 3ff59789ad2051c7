"""The generation base and head-less adapters (issue 16 item 1): the tiny Llama, its spec and
fingerprint, refused settings, generation adapters through the artifact and peft formats, the
TAILOR_TASKS default. The real SmolLM2 (converted from its GGUF once, then cached) is ``slow``."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch

from adapters.artifact import AdapterArtifact
from adapters.errors import ArtifactError, TaskMismatchError
from adapters.generation.base import DECODER_LINEARS, load_causal_base, tiny_causal_base
from adapters.generation.synthetic import random_generation_artifact
from adapters.peft_format import export_peft, import_peft
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.synthetic import random_artifact
from adapters.tasks import TEXT_GENERATION, get_task

# content-addressed (keyed by the GGUF's sha256) and written atomically: safe to share between runs
CACHE = Path(tempfile.gettempdir()) / "tailor-test" / "bases"


@pytest.fixture(scope="module")
def base():
    return tiny_causal_base(0, cache_dir=CACHE)


def test_tiny_base_spec_and_fingerprint(base):
    spec = base.spec
    assert spec.task == TEXT_GENERATION and spec.head_in_features == 0
    assert len(spec.linear_shapes) == 2 * len(DECODER_LINEARS)  # 2 layers, every decoder linear
    assert spec.linear_shapes["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert spec.linear_shapes["model.layers.1.self_attn.k_proj"] == (64, 32)  # 2 KV heads of 16
    assert spec.linear_shapes["model.layers.1.mlp.down_proj"] == (128, 64)
    assert "lm_head" not in spec.linear_shapes and not any("embed" in p for p in spec.linear_shapes)
    assert not any(p.requires_grad for p in base.model.parameters()) and not base.model.training
    again = tiny_causal_base(0, cache_dir=CACHE)
    assert again.fingerprint == spec.fingerprint
    assert tiny_causal_base(1, cache_dir=CACHE).fingerprint != spec.fingerprint
    assert base.tokenizer.chat_template and base.eos_token_ids
    assert base.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4  # K and V, 2 layers, 2 heads of 16, fp32


def test_the_tiny_base_pads_with_a_token_of_its_own_and_its_end_of_turn_has_an_embedding(base):
    """With SmolLM2's pad (= its end of turn) Llama zeroed the end of turn's (tied) embedding: its
    logit was 0 whatever an adapter learned, and a trained adapter could never stop."""
    tok, model = base.tokenizer, base.model
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>" != tok.eos_token
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    emb = model.get_input_embeddings().weight
    assert float(emb[tok.eos_token_id].abs().sum()) > 0 and float(emb[tok.pad_token_id].abs().sum()) == 0
    assert model.get_output_embeddings().weight.data_ptr() == emb.data_ptr()  # tied: the eos logit can move
    assert tok.eos_token_id in base.eos_token_ids and tok.pad_token_id not in base.eos_token_ids


def test_settings_are_checked_at_start(tmp_path):
    with pytest.raises(ValueError, match="tiny:SEED"):
        load_causal_base("tiny:x")
    with pytest.raises(ValueError, match="not a directory"):
        load_causal_base(str(tmp_path / "missing"))
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="unsupported architecture 'bert'; supported: llama"):
        load_causal_base(str(tmp_path / "bert"))


def test_a_local_directory_loads_with_the_same_fingerprint_shape(base, tmp_path):
    base.model.save_pretrained(str(tmp_path / "m"))
    base.tokenizer.save_pretrained(str(tmp_path / "m"))
    local = load_causal_base(str(tmp_path / "m"), device="cpu")
    assert local.spec.task == TEXT_GENERATION and local.spec.linear_shapes == base.spec.linear_shapes
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.equal(local.model(ids).logits, base.model(ids).logits)
    (tmp_path / "m" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="no \\*.safetensors"):
        load_causal_base(str(tmp_path / "m"))


def test_a_headless_adapter_round_trips_and_checks_its_base(base):
    art = random_generation_artifact(base.spec, r=4, targets=("q_proj", "down_proj"), seed=3)
    blob, manifest_bytes, manifest = art.encode()
    back = AdapterArtifact.decode(blob, manifest_bytes)
    assert back.manifest.labels == () and back.manifest.head_in_features == 0 and back.weights.headless
    assert not any(k.startswith("head") for k in __import__("safetensors.torch").torch.load(blob))
    back.check_base(base.spec)
    loaded = LoadedAdapter.from_artifact(VersionKey("t", "a", 1, manifest.weights_sha256), back, torch.float32)
    assert loaded.n_labels == 0 and set(loaded.lora) == set(art.weights.lora)
    # a classifier's adapter on the generation base, and the other way round: both tasks named
    from adapters.base import tiny_base
    text = tiny_base(0)
    with pytest.raises(TaskMismatchError, match="text-classification adapter.*serves text-generation"):
        random_artifact(text.spec).check_base(base.spec)
    with pytest.raises(TaskMismatchError, match="text-generation adapter.*serves text-classification"):
        back.check_base(text.spec)


def test_headless_rules_are_enforced(base):
    art = random_generation_artifact(base.spec, r=2, targets=("v_proj",))
    d = art.manifest.to_dict()
    with pytest.raises(ArtifactError, match="no labels and no head"):
        AdapterArtifact.decode(art.encode()[0], {**d, "labels": ["a", "b"]})
    with pytest.raises(ArtifactError, match="no labels and no head"):
        AdapterArtifact.decode(art.encode()[0], {**d, "head_in_features": 64})
    # a head in the weights of a head-less adapter
    from adapters.artifact import AdapterWeights
    headed = AdapterArtifact(art.manifest, AdapterWeights(art.weights.lora, torch.zeros(2, 64), torch.zeros(2)))
    with pytest.raises(ArtifactError, match="has no head, but its weights hold"):
        headed.validate()
    # a classifier without any head tensors is still refused, by name
    from adapters.base import tiny_base
    cls = random_artifact(tiny_base(0).spec)
    bare = AdapterArtifact(cls.manifest, AdapterWeights(cls.weights.lora, torch.zeros(0, 0), torch.zeros(0)))
    with pytest.raises(ArtifactError, match="lack 'head.weight'"):
        AdapterArtifact.decode(bare.weights.to_safetensors(), cls.manifest.to_dict())


def test_peft_export_import_of_a_generation_adapter(base, tmp_path):
    import peft

    art = random_generation_artifact(base.spec, r=4, targets=("q_proj", "v_proj", "gate_proj"), seed=1)
    files = export_peft(art, base.spec)
    config = json.loads(files["adapter_config.json"])
    assert config["task_type"] == get_task(TEXT_GENERATION).peft_task_type == "CAUSAL_LM"
    assert config["modules_to_save"] is None
    back = import_peft(files, base.spec)
    assert back.manifest.kind == TEXT_GENERATION and back.manifest.labels == () and back.weights.headless
    for path, (a, b) in art.weights.lora.items():
        assert torch.equal(back.weights.lora[path][0], a) and torch.equal(back.weights.lora[path][1], b)
    with pytest.raises(ArtifactError, match="has no labels"):
        import_peft(files, base.spec, labels=["a", "b"])
    # peft itself reads the export
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    model = peft.PeftModel.from_pretrained(base.model, str(tmp_path))
    assert isinstance(model, peft.PeftModelForCausalLM)
    model.unload()  # leaves the base model's linears as they were


def test_tailor_tasks_default_is_the_classifiers(tmp_path):
    from service.settings import Settings

    env = {"TAILOR_HOME": str(tmp_path), "TAILOR_ADMIN_KEY": "k" * 20}
    assert TEXT_GENERATION not in Settings.from_env(env).tasks
    asked = Settings.from_env({**env, "TAILOR_TASKS": "text-generation,text-classification"})
    assert asked.tasks == ("text-classification", TEXT_GENERATION)


@pytest.mark.slow
def test_the_bundled_smollm2_is_converted_once_then_loads_from_the_cache():
    first = load_causal_base(None, device="cpu", cache_dir=CACHE)
    assert first.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and first.spec.task == TEXT_GENERATION
    assert len(first.spec.linear_shapes) == 30 * 7 and first.spec.linear_shapes[
        "model.layers.0.self_attn.k_proj"] == (576, 192)
    folders = [p for p in CACHE.iterdir() if (p / "model.safetensors").is_file()]
    assert len(folders) == 1 and folders[0].name.startswith("smollm2-")
    written = (folders[0] / "model.safetensors").stat().st_mtime_ns
    again = load_causal_base(None, device="cpu", cache_dir=CACHE)
    assert again.fingerprint == first.fingerprint
    assert (folders[0] / "model.safetensors").stat().st_mtime_ns == written  # read, not converted again
    ids = first.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                              return_dict=False)
    assert torch.equal(first.model(torch.tensor([ids])).logits, again.model(torch.tensor([ids])).logits)
