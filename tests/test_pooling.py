"""Pooling from the base's own configuration: read, recorded, trained and served alike, mixed."""

from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from torch import nn

from adapters.artifact import AdapterArtifact, AdapterManifest
from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.errors import ArtifactError
from adapters.peft_format import export_peft, import_peft
from adapters.pooling import POOLER, Pooling, apply_rows, attach, pool_tokens, read_pooling
from adapters.registry import Registry
from adapters.runtime.engine import Engine
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from adapters.training import Hyperparameters, train
from adapters.training.text_task import TextTask
from tests.training_data import FAST_HP, sentiment

MEAN = Pooling("mean", normalize=True)
DEEP = Pooling("mean", layers="all")  # what the head method reads
TEXTS = ["good morning", "a dreadful film with a plot that never arrives", "taxes", "the cup final was grim",
         "so-so service"]
LABELS = ("neg", "pos")


def st_layout(directory, pooling_config: dict, normalize: bool = True, extra: list[str] | None = None):
    """A tiny random BERT saved as a sentence-transformers model folder."""
    b = tiny_base(seed=5)
    b.model.save_pretrained(directory)
    b.tokenizer.save_pretrained(directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    for t in extra or []:
        modules.append({"idx": len(modules), "name": t, "path": t, "type": f"sentence_transformers.models.{t}"})
    (directory / "modules.json").write_text(json.dumps(modules))
    (directory / "1_Pooling").mkdir()
    config = {"word_embedding_dimension": 32, "pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False,
              "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False, **pooling_config}
    (directory / "1_Pooling" / "config.json").write_text(json.dumps(config))
    return directory


def test_pooling_is_read_from_a_sentence_transformers_layout(tmp_path):
    d = st_layout(tmp_path / "st", {"pooling_mode_mean_tokens": True})
    base = load_base(str(d))
    assert base.spec.pooling == MEAN and base.spec.pools_tokens
    # not part of the fingerprint: the same weights under the model's own pooler are the same base
    assert load_base(str(d), pooling=POOLER).spec.fingerprint == base.spec.fingerprint
    assert read_pooling(st_layout(tmp_path / "cls", {"pooling_mode_cls_token": True}, normalize=False)) \
        == Pooling("cls")
    assert read_pooling(st_layout(tmp_path / "max", {"pooling_mode_max_tokens": True})) == Pooling("max", True)


@pytest.mark.parametrize("config,extra", [
    ({"pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": True}, None),  # concatenated: not ours
    ({"pooling_mode_weightedmean_tokens": True}, None),
    ({"pooling_mode_mean_tokens": True}, ["Dense"]),
])
def test_a_layout_we_cannot_reproduce_falls_back_to_the_pooler(tmp_path, config, extra):
    assert read_pooling(st_layout(tmp_path / "m", config, extra=extra)) == POOLER


def test_a_plain_model_folder_keeps_the_pooler(tmp_path):
    b = tiny_base(seed=5)
    b.model.save_pretrained(tmp_path)
    b.tokenizer.save_pretrained(tmp_path)
    assert load_base(str(tmp_path)).spec.pooling == POOLER
    (tmp_path / "modules.json").write_text("not json")
    assert read_pooling(tmp_path) == POOLER


def test_token_pooling_ignores_padding():
    h = torch.randn(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.allclose(pool_tokens("mean", h, mask)[0], h[0, :2].mean(0))
    assert torch.allclose(pool_tokens("max", h, mask)[0], h[0, :2].max(0).values)
    assert torch.allclose(pool_tokens("mean_sqrt_len", h, mask)[0], h[0, :2].sum(0) / 2 ** 0.5)
    assert torch.equal(pool_tokens("cls", h, mask), h[:, 0])
    # rows of several poolings: each row gets its own, the model's own pooled output untouched
    pooled = torch.randn(2, 3)
    out = apply_rows((POOLER, MEAN), pooled, h, mask)
    assert torch.equal(out[0], pooled[0])
    assert torch.allclose(out[1], F.normalize(h[1].mean(0), dim=0))


def test_manifest_records_pooling_and_an_old_manifest_means_the_pooler():
    base = tiny_base(seed=1, pooling=MEAN)
    art = random_artifact(base.spec, seed=1)
    d = replace(art.manifest, pooling=MEAN).to_dict()
    assert d["pooling"] == {"mode": "mean", "normalize": True}
    assert AdapterManifest.from_dict(d).pooling == MEAN
    del d["pooling"]  # published before pooling was recorded
    assert AdapterManifest.from_dict(d).pooling == POOLER
    for bad in ({"mode": "median"}, {"mode": "mean", "normalize": "yes"}, "mean", {"mode": "mean", "x": 1}):
        with pytest.raises(ArtifactError, match="pooling"):
            AdapterManifest.from_dict({**d, "pooling": bad})
    # a base that cannot give token states refuses an adapter that pools them
    mean_art = AdapterArtifact(manifest=replace(art.manifest, pooling=MEAN), weights=art.weights)
    mean_art.check_base(base.spec)
    with pytest.raises(ArtifactError, match="pools tokens"):
        mean_art.check_base(replace(base.spec, pools_tokens=False))


def test_peft_round_trip_keeps_pooling():
    base = tiny_base(seed=1)
    art = random_artifact(base.spec, seed=1)
    art = AdapterArtifact(manifest=replace(art.manifest, pooling=Pooling("max")), weights=art.weights)
    assert import_peft(export_peft(art, base.spec), base.spec).manifest.pooling == Pooling("max")


# -- serving --------------------------------------------------------------------------------

def engine_on(tmp_path, base):
    tmp_path.mkdir(exist_ok=True)
    catalog = Catalog(Registry(f"sqlite:///{tmp_path}/r.db"), LocalStore(tmp_path / "store"))
    catalog.registry.create_tenant("acme")
    return Engine(base, catalog), catalog


def publish(engine, catalog, name, art):
    catalog.publish("acme", name, art, promote=True, spec=engine.base.spec)
    return engine.acquire(engine.resolve("acme", name))


def peft_solo(base, pristine, art, folder, pooling=POOLER):
    """The reference: peft runs the adapter alone on a fresh copy of the base, its head reading ``pooling``."""
    model = copy.deepcopy(pristine)
    setattr(model, base.head_name, nn.Linear(base.spec.head_in_features, len(art.manifest.labels)))
    folder.mkdir()
    for fname, data in export_peft(art, base.spec).items():
        (folder / fname).write_bytes(data)
    ref = PeftModel.from_pretrained(model, str(folder)).eval()
    attach(model, base.head_name, pooling)
    with torch.inference_mode():
        return ref(**base.tokenize(TEXTS)).logits


def test_mixed_batch_gives_each_pooling_its_solo_logits(tmp_path):
    base = tiny_base(seed=3, pooling=MEAN)
    pristine = copy.deepcopy(base.model)
    engine, catalog = engine_on(tmp_path, base)
    old = random_artifact(base.spec, seed=1, n_labels=2)  # as published before: no pooling recorded
    assert old.manifest.pooling == POOLER
    new = random_artifact(base.spec, seed=2, n_labels=3, targets=("query", "key", "value"))
    new = AdapterArtifact(manifest=replace(new.manifest, pooling=MEAN), weights=new.weights)
    cls_ = random_artifact(base.spec, seed=3, n_labels=2)
    cls_ = AdapterArtifact(manifest=replace(cls_.manifest, pooling=Pooling("cls")), weights=cls_.weights)
    deep = random_artifact(base.spec, seed=4, n_labels=3)
    deep = AdapterArtifact(manifest=replace(deep.manifest, pooling=DEEP), weights=deep.weights)
    a, b, c = publish(engine, catalog, "old", old), publish(engine, catalog, "new", new), publish(engine, catalog, "c", cls_)
    d = publish(engine, catalog, "deep", deep)
    want = {"old": peft_solo(base, pristine, old, tmp_path / "old"),
            "new": peft_solo(base, pristine, new, tmp_path / "new", MEAN),
            "c": peft_solo(base, pristine, cls_, tmp_path / "c", Pooling("cls")),
            "deep": peft_solo(base, pristine, deep, tmp_path / "deep", DEEP)}
    # an independent check of the mean reference: masked mean of the adapted backbone, normalised
    inputs = base.tokenize(TEXTS)
    assert (inputs["attention_mask"] == 0).any()  # padding present: a mask ignored would show
    rows = [a, b, None, c, d]
    names = ["old", "new", None, "c", "deep"]
    out = engine.forward(inputs, rows)
    for i, name in enumerate(names):
        if name is not None:
            assert (out.logits[i] - want[name][i]).abs().max().item() <= 1e-5, (i, name)
    # a base row reads the base's pooling
    with torch.inference_mode():
        hidden = pristine.bert(**inputs).last_hidden_state
    mean = F.normalize(pool_tokens("mean", hidden, inputs["attention_mask"]), dim=-1)
    assert torch.allclose(out.features[2], mean[2], atol=1e-5)
    # the old adapter serves exactly as on a base whose pooling was never read
    plain = tiny_base(seed=3)
    engine2, catalog2 = engine_on(tmp_path / "2", plain)
    a2 = publish(engine2, catalog2, "old", old)
    solo = engine2.forward(inputs, [a2] * len(TEXTS))
    assert torch.allclose(out.logits[0], solo.logits[0], atol=1e-6)
    # each row alone equals its row in the mixed batch
    for i, row in enumerate(rows):
        if row is not None:
            alone = engine.forward(base.tokenize([TEXTS[i]]), [row]).logits[0]
            assert (alone - out.logits[i]).abs().max().item() <= 1e-5


def test_all_layers_pooling_is_the_mean_of_every_blocks_output_and_is_recorded_only_when_used(tmp_path):
    base = tiny_base(seed=3, pooling=DEEP)
    pristine = copy.deepcopy(base.model)
    engine, _ = engine_on(tmp_path, base)
    inputs = base.tokenize(TEXTS)
    out = engine.forward(inputs, [None] * len(TEXTS))  # base rows read the base's pooling
    with torch.inference_mode():
        states = pristine.bert(**inputs, output_hidden_states=True).hidden_states  # embeddings, then each block
    want = pool_tokens("mean", torch.stack(states[1:]).mean(0), inputs["attention_mask"])
    assert len(states) == 3 and torch.allclose(out.features, want, atol=1e-5)
    last = pool_tokens("mean", states[-1], inputs["attention_mask"])
    assert (out.features - last).abs().max() > 1e-3  # and it is not the last layer's
    assert DEEP.to_dict() == {"mode": "mean", "normalize": False, "layers": "all"}
    assert MEAN.to_dict() == {"mode": "mean", "normalize": True}  # old manifests and fingerprints read the same
    assert Pooling.from_dict(DEEP.to_dict()) == DEEP and Pooling.parse(str(DEEP)) == DEEP
    assert str(Pooling("cls", True, "all")) == "cls+all_layers+normalize"
    with pytest.raises(ValueError, match="token mode"):
        Pooling("pooler", layers="all")
    with pytest.raises(ValueError, match="layers"):
        Pooling("mean", layers="some")
    with pytest.raises(ValueError, match="all_layers"):
        Pooling.parse("mean+deep")


# -- training = serving -------------------------------------------------------------------

@pytest.mark.parametrize("method,solver", [("lora", "auto"), ("head", "adamw"), ("head", "lbfgs")])
def test_served_logits_equal_training_time_logits_with_mean_pooling(tmp_path, method, solver):
    tr, va = sentiment(60, seed=0), sentiment(20, seed=1)
    ids = {n: i for i, n in enumerate(LABELS)}
    trainer_base = tiny_base(seed=1, initializer_range=0.3, pooling=MEAN)
    res = train(trainer_base, [r["text"] for r in tr], [ids[r["label"]] for r in tr], LABELS,
                [r["text"] for r in va], [ids[r["label"]] for r in va], method=method,
                hp=Hyperparameters.from_dict({**FAST_HP, "epochs": 3, "solver": solver}), threads=1)
    # the head method reads the mean of every layer's token states, not normalised; LoRA the base's pooling
    want = Pooling(mode="mean", normalize=False, layers="all") if method == "head" else MEAN
    assert res.artifact.manifest.pooling == want
    assert (res.metrics["steps"] == 0) == (solver == "lbfgs")  # the closed-form fit takes no optimizer steps
    texts = [r["text"] for r in va] + TEXTS
    with torch.inference_mode():
        trained = res.model(**trainer_base.tokenize(texts)).logits
    engine, catalog = engine_on(tmp_path, tiny_base(seed=1, initializer_range=0.3, pooling=MEAN))
    loaded = publish(engine, catalog, "sent", res.artifact)
    served = torch.stack(engine.forward(engine.base.tokenize(texts), [loaded] * len(texts)).logits)
    assert (served - trained).abs().max().item() <= 1e-5
    # and the pooling mattered: the model's own pooled output gives other logits
    pooler_res = AdapterArtifact(manifest=replace(res.artifact.manifest, pooling=POOLER), weights=res.artifact.weights)
    other = publish(engine, catalog, "pooler", pooler_res)
    assert (torch.stack(engine.forward(engine.base.tokenize(texts), [other] * len(texts)).logits) - trained).abs().max() > 1e-3


def test_a_checkpoint_of_another_pooling_is_not_resumed_and_pooler_runs_keep_theirs(tmp_path):
    hp = Hyperparameters.from_dict(FAST_HP).resolve(40, "head", torch.device("cpu"))
    data = (["good", "bad"], [1, 0], ["fine"], [1])
    prints = {}
    for name, pooling in (("pooler", POOLER), ("mean", MEAN)):
        prints[name] = TextTask(tiny_base(seed=1, pooling=pooling), LABELS, "head", hp, *data).fingerprint()
    assert prints["pooler"] != prints["mean"]
    # a pooler run hashes exactly what it hashed before pooling was recorded
    # (settings added since, at their neutral values, are not hashed: the fields it had then)
    then = {k: v for k, v in hp.to_dict().items()
            if k not in ("head_lr_scale", "lora_plus_ratio", "use_rslora", "search", "solver", "head_init")}
    want = hashlib.sha256(json.dumps(["head", list(LABELS), then, tiny_base(seed=1).spec.fingerprint],
                                     sort_keys=True).encode())
    for part in data:
        want.update(json.dumps(part).encode())
    assert prints["pooler"] == want.hexdigest()
