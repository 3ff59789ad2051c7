"""Imports are held to the bar training sets (issue 11, item 2).

An imported adapter's label names follow the dataset rules (the same functions judge both), its
``target_modules`` must name linear layers of the base, and it must give finite logits through
the real mixed forward path; a job's ``target_modules`` are checked against the base when it is
submitted. Library first, then over HTTP against a real ``bentoml serve``.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import httpx
import pytest
import torch

from adapters.artifact import AdapterArtifact, AdapterWeights
from adapters.base import load_base, tiny_base
from adapters.catalog import Catalog
from adapters.datasets import DatasetLimits, from_records, label_problem
from adapters.errors import ArtifactError, DatasetError
from adapters.import_checks import check_target_modules, clean_labels, probe_logits
from adapters.jobs.manager import JobManager
from adapters.peft_format import CONFIG_FILE, TAILOR_FILE, export_peft, import_peft, zip_files
from adapters.registry import Registry
from adapters.runtime.engine import Engine, EngineConfig
from adapters.store import LocalStore
from adapters.synthetic import random_artifact
from adapters.training.hyperparams import HyperparameterError

BAD_LABELS = ["bell\x07", "tab\tinside", "x" * 129, "lone \ud800", "del\x7f", "   "]


@pytest.fixture(scope="module")
def base():
    return tiny_base(seed=1)


@pytest.fixture(scope="module")
def spec(base):
    return base.spec


@pytest.fixture()
def engine(tmp_path):
    b = tiny_base(seed=1)  # the engine wraps its model in place: a base of its own
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    return Engine(b, Catalog(reg, LocalStore(tmp_path / "store")), EngineConfig(max_resident=4, device_slots=4,
                                                                                max_batch_size=2))


def with_lora_a(art: AdapterArtifact, value: float) -> AdapterArtifact:
    lora = {p: (torch.full_like(a, value), b) for p, (a, b) in art.weights.lora.items()}
    return replace(art, weights=AdapterWeights(lora=lora, head_weight=art.weights.head_weight,
                                               head_bias=art.weights.head_bias))


def with_lora_b(art: AdapterArtifact, value: float) -> AdapterArtifact:
    lora = {p: (a, torch.full_like(b, value)) for p, (a, b) in art.weights.lora.items()}
    return replace(art, weights=AdapterWeights(lora=lora, head_weight=art.weights.head_weight,
                                               head_bias=art.weights.head_bias))


def with_labels(art: AdapterArtifact, labels: tuple[str, ...]) -> AdapterArtifact:
    return replace(art, manifest=replace(art.manifest, labels=labels))


# -- labels: the dataset rules, the same functions ----------------------------------------------------

@pytest.mark.parametrize("label", BAD_LABELS)
def test_a_label_a_dataset_refuses_is_refused_for_an_import_with_the_same_words(label):
    with pytest.raises(DatasetError) as from_data:
        from_records([{"text": "a", "label": label}, {"text": "b", "label": "ok"}])
    with pytest.raises(ArtifactError) as imported:
        clean_labels(["ok", label])
    problem = label_problem(label.strip())
    assert problem and problem in from_data.value.message and problem in imported.value.message
    assert imported.value.param == "labels" and imported.value.message.startswith("labels[1] ")


def test_label_count_and_uniqueness_follow_the_tenant_limits():
    assert clean_labels([" neg ", "pos"]) == ("neg", "pos")  # stripped, as uploads are
    limits = DatasetLimits(max_labels=3)
    with pytest.raises(ArtifactError, match="has 4 labels; the limit is 3"):
        clean_labels(["a", "b", "c", "d"], limits)
    with pytest.raises(ArtifactError, match="only one label"):
        clean_labels(["a"], limits)
    with pytest.raises(ArtifactError, match=r"labels\[2\] repeats labels\[0\]"):
        clean_labels(["a", "b", " a"])
    with pytest.raises(ArtifactError, match="must be a string"):
        clean_labels(["a", 3])


def test_import_peft_applies_the_label_rules_to_every_source(spec):
    files = export_peft(with_labels(random_artifact(spec, seed=1), ("fine", "bad\x1b[31m")), spec)
    with pytest.raises(ArtifactError, match="control character") as e:  # from the tailor manifest
        import_peft(files, spec)
    assert e.value.param == "labels"
    good = export_peft(random_artifact(spec, seed=1), spec)
    with pytest.raises(ArtifactError, match="control character"):  # given by the caller
        import_peft(good, spec, labels=["a", "b\x00"])
    assert import_peft(good, spec, labels=["  neg", "pos  "]).manifest.labels == ("neg", "pos")
    wide = export_peft(random_artifact(spec, seed=2, n_labels=5), spec)
    with pytest.raises(ArtifactError, match="has 5 labels; the limit is 4"):  # the tenant's max_labels
        import_peft(wide, spec, limits=DatasetLimits(max_labels=4))


# -- target modules --------------------------------------------------------------------------------

def peft_files_with_targets(spec, targets) -> dict[str, bytes]:
    files = export_peft(random_artifact(spec, seed=3), spec)
    config = json.loads(files[CONFIG_FILE])
    config["target_modules"] = targets
    return {**files, CONFIG_FILE: json.dumps(config).encode()}


@pytest.mark.parametrize("targets", [["../../etc"], ["query", "../../etc"], ["classifier"], ["nope"], [7], {"a": 1}])
def test_target_modules_must_name_linear_layers_of_the_base(spec, targets):
    with pytest.raises(ArtifactError) as e:
        import_peft(peft_files_with_targets(spec, targets), spec)
    assert e.value.param == "target_modules", e.value


def test_good_target_modules_are_kept_and_a_regex_falls_back_to_the_weights(spec):
    art = import_peft(peft_files_with_targets(spec, ["value", "query", "query"]), spec)
    assert art.manifest.lora.target_modules == ("query", "value")
    art = import_peft(peft_files_with_targets(spec, ".*(query|value)$"), spec)
    assert art.manifest.lora.target_modules == ("query", "value")
    full = sorted(art.weights.lora)[:2]  # full module paths are names too
    assert import_peft(peft_files_with_targets(spec, full), spec).manifest.lora.target_modules == tuple(full)


def test_the_head_is_never_a_lora_target(spec):
    for target in ("classifier", "bert.classifier"):
        with pytest.raises(ArtifactError, match="classification head|matches no linear layer"):
            check_target_modules(spec, [target])
    with pytest.raises(HyperparameterError) as e:
        check_target_modules(spec, ["query", "classifier"], param="hyperparameters.target_modules",
                             error=HyperparameterError)
    assert e.value.param == "hyperparameters.target_modules" and "query" in e.value.message  # suggests names


def test_job_target_modules_are_checked_against_the_base_at_submit(tmp_path, spec):
    reg = Registry(f"sqlite:///{tmp_path / 'r.db'}")
    reg.create_tenant("acme")
    jm = JobManager(reg.engine, LocalStore(tmp_path / "store"))
    data = from_records([{"text": f"t{i}", "label": "ab"[i % 2]} for i in range(6)])
    for bad in (["classifier"], ["../../etc"]):
        with pytest.raises(HyperparameterError) as e:
            jm.submit("acme", "a", training=data, hyperparameters={"target_modules": bad}, spec=spec)
        assert e.value.param == "hyperparameters.target_modules"
    assert jm.list("acme") == [] and jm.store.list("tenants/acme/") == []
    assert jm.submit("acme", "a", training=data, hyperparameters={"target_modules": ["query"]}, spec=spec)
    assert jm.submit("acme", "b", training=data, spec=spec)  # "auto"


# -- the probe: finite logits through the real forward path ---------------------------------------------

def test_a_sound_adapter_passes_the_probe_and_leaves_no_slot(engine):
    probe_logits(engine, random_artifact(engine.base.spec, seed=4))
    assert len(engine.slots) == 0


@pytest.mark.parametrize("make", [
    lambda spec: random_artifact(spec, seed=5, alpha=1e308),  # a finite scale that overflows
    lambda spec: with_lora_a(random_artifact(spec, seed=5), 1e38),  # finite weights that overflow
    lambda spec: with_lora_b(random_artifact(spec, seed=5), 3e38),  # finite B, times the scale (2): not
], ids=["alpha-1e308", "lora-A-1e38", "lora-B-3e38"])
def test_non_finite_logits_refuse_the_adapter_naming_the_problem(engine, make):
    art = make(engine.base.spec)
    art.validate()  # every tensor is finite: only running it shows the problem
    with pytest.raises(ArtifactError, match="non-finite logits") as e:
        probe_logits(engine, art)
    assert e.value.param == "file" and "lora_alpha" in e.value.message
    assert len(engine.slots) == 0  # the probe's slot is freed either way


def test_peft_files_with_a_huge_alpha_import_but_fail_the_probe(engine):
    spec = engine.base.spec
    files = export_peft(random_artifact(spec, seed=6), spec)
    config = json.loads(files[CONFIG_FILE])
    config["lora_alpha"] = 1e308
    files = {CONFIG_FILE: json.dumps(config).encode(), **{k: v for k, v in files.items() if k != CONFIG_FILE}}
    del files[TAILOR_FILE]
    art = import_peft(files, spec)
    with pytest.raises(ArtifactError, match="non-finite logits"):
        probe_logits(engine, art)


# -- over HTTP, against a real bentoml serve -------------------------------------------------------------

@pytest.fixture(scope="module")
def served_spec(served):  # noqa: F811
    return load_base(str(served.model_dir)).spec


def tenant_client(served) -> httpx.Client:  # noqa: F811
    name = f"imp{uuid.uuid4().hex[:10]}"
    with served.client(served.admin_key) as admin:
        r = admin.post("/v1/tenants", json={"name": name})
        assert r.status_code == 201, r.text
    return served.client(r.json()["api_key"])


def post_zip(c: httpx.Client, name: str, files: dict[str, bytes], **form: str) -> httpx.Response:
    return c.post(f"/v1/adapters/{name}/import", files={"file": ("a.zip", zip_files(files), "application/zip")},
                  data=form)


def error(r: httpx.Response, status: int, param: str | None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err.get("param") == param, err
    return err


def test_bad_imports_are_refused_over_http_and_store_nothing(served, served_spec):  # noqa: F811
    spec = served_spec
    with tenant_client(served) as c:
        huge_alpha = export_peft(random_artifact(spec, seed=7, alpha=1e308), spec)
        err = error(post_zip(c, "a", huge_alpha), 422, "file")
        assert "non-finite" in err["message"] and err["code"] == "invalid_artifact"
        err = error(post_zip(c, "a", export_peft(with_lora_a(random_artifact(spec, seed=7), 1e38), spec)), 422, "file")
        assert "non-finite" in err["message"]
        err = error(post_zip(c, "a", peft_files_with_targets(spec, ["../../etc"])), 422, "target_modules")
        assert "../../etc" in err["message"]
        error(post_zip(c, "a", peft_files_with_targets(spec, ["classifier"])), 422, "target_modules")
        good = export_peft(random_artifact(spec, seed=8), spec)
        err = error(post_zip(c, "a", good, labels='["ok", "bell\\u0007"]'), 422, "labels")
        assert "control character" in err["message"]
        error(post_zip(c, "a", good, labels="ok,"), 422, "labels")  # an empty name
        error(post_zip(c, "a", good, labels="x" * 129 + ",ok"), 422, "labels")
        error(post_zip(c, "a", export_peft(with_labels(random_artifact(spec, seed=8), ("ok", "a\nb")), spec)),
              422, "labels")
        assert c.get("/v1/adapters").json() == []
        r = post_zip(c, "a", good, labels=" neg , pos ")
        assert r.status_code == 201 and r.json()["labels"] == ["neg", "pos"], r.text
        out = c.post("/v1/predict", json={"adapter": "a", "inputs": ["hello"]}).json()
        assert isinstance(out["predictions"][0]["score"], float)


def test_a_job_naming_the_head_as_a_target_is_refused_at_submit_over_http(served):  # noqa: F811
    rows = [{"text": f"text {i}", "label": "ab"[i % 2]} for i in range(8)]
    with tenant_client(served) as c:
        for targets in (["classifier"], ["../../etc"]):
            r = c.post("/v1/jobs", json={"adapter": "j", "training_data": rows,
                                         "hyperparameters": {"target_modules": targets}})
            err = error(r, 422, "hyperparameters.target_modules")
            assert err["code"] == "invalid_hyperparameters"
        assert c.get("/v1/jobs").json() == []
        r = c.post("/v1/jobs", json={"adapter": "j", "training_data": rows,
                                     "hyperparameters": {"target_modules": ["query", "value"]}})
        assert r.status_code == 201, r.text
        assert c.post(f"/v1/jobs/{r.json()['id']}/cancel").status_code == 200
