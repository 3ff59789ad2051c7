"""Service settings from the environment: defaults, clear errors, the generated admin key."""

from __future__ import annotations

import os
import logging
import stat
from concurrent.futures import ThreadPoolExecutor

import pytest

from service.settings import Settings, SettingsError


def test_defaults(tmp_path):
    s = Settings.from_env({"TAILOR_HOME": str(tmp_path / "home"), "TAILOR_ADMIN_KEY": "k" * 20})
    assert s.home == (tmp_path / "home").resolve() and s.home.is_dir()
    assert s.database_url == f"sqlite:///{s.home}/tailor.db"
    assert s.store_url == f"file://{s.home}/store"
    assert (s.max_inputs, s.max_input_chars, s.max_body_bytes, s.max_upload_bytes) == (64, 10_000, 10 << 20, 64 << 20)
    assert (s.workers, s.train_workers, s.rate_limit, s.metrics_tenant_labels) == (None, 1, 50.0, False)
    assert s.max_queued_rows == 256
    assert s.base_model is None and s.device_slots > s.max_batch_size and s.store_gc_hours == 6.0
    assert "k" * 20 not in repr(s)
    off = Settings.from_env({"TAILOR_HOME": str(tmp_path / "home"), "TAILOR_STORE_GC_HOURS": "0"}, admin_key=False)
    assert off.store_gc_hours == 0.0
    assert s.split_cost_tokens is None  # auto: the engine's choice for its device
    for raw, want in (("auto", None), ("0", 0), ("512", 512)):
        env = {"TAILOR_HOME": str(tmp_path / "home"), "TAILOR_SPLIT_COST_TOKENS": raw}
        assert Settings.from_env(env, admin_key=False).split_cost_tokens == want


@pytest.mark.parametrize("name, value, words", [
    ("TAILOR_WORKERS", "two", "not an integer"),
    ("TAILOR_WORKERS", "0", "out of range"),
    ("TAILOR_WORKERS", "automatic", "not an integer"),
    ("TAILOR_MAX_WAIT_MS", "-1", "out of range"),
    ("TAILOR_RATE_LIMIT", "fast", "not a number"),
    ("TAILOR_METRICS_TENANT_LABELS", "maybe", "1/0"),
    ("TAILOR_ADMIN_KEY", "short", "at least 16"),
    ("TAILOR_BASE_MODEL", "/does/not/exist", "not a directory"),
    ("TAILOR_STORE_URL", "gs://bucket", "only file:// and s3://"),
    ("TAILOR_STORE_URL", "s3://Bad_Bucket/x", "invalid S3 bucket name"),
    ("TAILOR_STORE_URL", "s3://ab", "invalid S3 bucket name"),
    ("TAILOR_STORE_URL", "s3://bucket/../x", "invalid store prefix"),
    ("TAILOR_STORE_URL", "s3://bucket/x?endpoint=http://h", "unknown s3 url option"),
    ("TAILOR_STORE_URL", "s3://bucket/x?endpoint_url=ftp://h", "http(s)://"),
    ("TAILOR_STORE_URL", "s3://key:secret@bucket/x", "credentials"),
    ("TAILOR_DATABASE_URL", "tailor.db", "not a URL"),
    ("TAILOR_STORE_GC_HOURS", "-1", "out of range"),
    ("TAILOR_STORE_GC_HOURS", "daily", "not a number"),
    ("TAILOR_TASKS", "audio", "not a task"),
    ("TAILOR_TASKS", "text-classification,images", "not a task"),
    ("TAILOR_TASKS", ",", "one or more of text-classification, image-classification"),
    ("TAILOR_IMAGE_BASE_MODEL", "/does/not/exist", "not a directory"),
    ("TAILOR_IMAGE_BASE_MODEL", "tiny:one", "integer SEED"),
    ("TAILOR_GENERATION_BASE_MODEL", "/does/not/exist", "not a directory"),
    ("TAILOR_GENERATION_BASE_MODEL", "tiny:x", "integer SEED"),
    ("TAILOR_GENERATION_KV_CACHE_BYTES", "12", "out of range"),
    ("TAILOR_GENERATION_ADMISSION_TIMEOUT_S", "soon", "not a number"),
    ("TAILOR_MAX_IMAGES", "0", "out of range"),
    ("TAILOR_MAX_IMAGE_BYTES", "lots", "not an integer"),
    ("TAILOR_SPLIT_COST_TOKENS", "-1", "out of range"),
    ("TAILOR_SPLIT_COST_TOKENS", "some", "not an integer"),
])
def test_bad_values_name_the_variable(tmp_path, name, value, words):
    env = {"TAILOR_HOME": str(tmp_path), name: value}
    with pytest.raises(SettingsError, match=name) as e:
        Settings.from_env(env)
    assert words in str(e.value)


def test_tasks_and_the_image_base(tmp_path):
    env = {"TAILOR_HOME": str(tmp_path), "TAILOR_ADMIN_KEY": "k" * 20}
    s = Settings.from_env(env)
    assert s.tasks == ("text-classification", "image-classification") and s.image_base_model is None
    assert (s.max_images, s.max_image_bytes, s.max_image_pixels) == (16, 4 << 20, 40_000_000)
    # predict's body limit has room for the images, sent as base64
    assert s.max_predict_bytes == 16 * 4 * ((4 << 20) + 2) // 3 + 65536 > s.max_body_bytes
    text = Settings.from_env({**env, "TAILOR_TASKS": " text-classification "})
    assert text.tasks == ("text-classification",) and text.max_predict_bytes == text.max_body_bytes
    both = Settings.from_env({**env, "TAILOR_TASKS": "image-classification,text-classification,image-classification"})
    assert both.tasks == ("text-classification", "image-classification")
    assert Settings.from_env({**env, "TAILOR_IMAGE_BASE_MODEL": "tiny:7"}).image_base_model == "tiny:7"
    (tmp_path / "vision").mkdir()
    with pytest.raises(SettingsError, match="TAILOR_IMAGE_BASE_MODEL.*no config.json"):
        Settings.from_env({**env, "TAILOR_IMAGE_BASE_MODEL": str(tmp_path / "vision")})
    (tmp_path / "vision" / "config.json").write_text('{"architecture": "efficientnet-lite0"}')
    given = Settings.from_env({**env, "TAILOR_IMAGE_BASE_MODEL": str(tmp_path / "vision")})
    assert given.image_base_model == str((tmp_path / "vision").resolve())


def test_text_generation_is_served_only_when_asked_for(tmp_path):
    env = {"TAILOR_HOME": str(tmp_path), "TAILOR_ADMIN_KEY": "k" * 20}
    s = Settings.from_env(env)
    assert "text-generation" not in s.tasks and s.generation_base_model is None
    assert (s.generation_kv_cache_bytes, s.generation_admission_timeout_s) == (512 << 20, 10.0)
    g = Settings.from_env({**env, "TAILOR_TASKS": "text-generation,text-classification",
                           "TAILOR_GENERATION_BASE_MODEL": "tiny:3", "TAILOR_GENERATION_KV_CACHE_BYTES": "65_536",
                           "TAILOR_GENERATION_ADMISSION_TIMEOUT_S": "0.5"})
    assert g.tasks == ("text-classification", "text-generation") and g.generation_base_model == "tiny:3"
    assert (g.generation_kv_cache_bytes, g.generation_admission_timeout_s) == (65536, 0.5)
    (tmp_path / "lm").mkdir()
    with pytest.raises(SettingsError, match="TAILOR_GENERATION_BASE_MODEL.*no config.json"):
        Settings.from_env({**env, "TAILOR_GENERATION_BASE_MODEL": str(tmp_path / "lm")})
    (tmp_path / "lm" / "config.json").write_text('{"model_type": "llama"}')
    given = Settings.from_env({**env, "TAILOR_GENERATION_BASE_MODEL": str(tmp_path / "lm")})
    assert given.generation_base_model == str((tmp_path / "lm").resolve())


def test_credentials_in_an_s3_url_are_refused_and_not_echoed(tmp_path):
    env = {"TAILOR_HOME": str(tmp_path), "TAILOR_STORE_URL": "s3://AKIAKEY:s3cret@bucket/x"}
    with pytest.raises(SettingsError, match="credentials") as e:
        Settings.from_env(env)
    assert "s3cret" not in str(e.value) and "AKIAKEY" not in str(e.value)


def test_s3_store_url_accepted_as_given(tmp_path):
    url = "s3://tailor-adapters/prod/eu?endpoint_url=http://127.0.0.1:9000&region=eu-west-1"
    s = Settings.from_env({"TAILOR_HOME": str(tmp_path), "TAILOR_STORE_URL": url})
    assert s.store_url == url  # parsed for syntax only: no bucket or network needed here


def test_batch_size_must_fit_the_device_slots(tmp_path):
    env = {"TAILOR_HOME": str(tmp_path), "TAILOR_MAX_BATCH_SIZE": "64", "TAILOR_DEVICE_SLOTS": "64"}
    with pytest.raises(SettingsError, match="TAILOR_DEVICE_SLOTS"):
        Settings.from_env(env)


def test_admin_key_generated_once_private_and_reused(tmp_path, caplog):
    env = {"TAILOR_HOME": str(tmp_path)}
    lazy = Settings.from_env(env, admin_key=False)
    assert lazy.admin_key == "" and not (tmp_path / "admin_key").exists()  # importing creates nothing
    with caplog.at_level(logging.WARNING, logger="tailor.service"):
        first = Settings.from_env(env)
        again = Settings.from_env(env)
    assert first.admin_key_generated and not again.admin_key_generated
    assert first.admin_key == again.admin_key and len(first.admin_key) >= 40
    assert stat.S_IMODE((tmp_path / "admin_key").stat().st_mode) == 0o600
    assert sum(first.admin_key in r.getMessage() for r in caplog.records) == 1  # logged exactly once
    assert not list(tmp_path.glob(".admin_key.*"))  # no temp files left


def test_concurrent_starts_agree_on_one_admin_key(tmp_path):
    with ThreadPoolExecutor(8) as pool:
        keys = list(pool.map(lambda _: Settings.from_env({"TAILOR_HOME": str(tmp_path)}), range(16)))
    assert len({s.admin_key for s in keys}) == 1
    assert sum(s.admin_key_generated for s in keys) == 1


def test_refuses_a_readable_admin_key_file(tmp_path):
    (tmp_path / "admin_key").write_text("x" * 40)
    (tmp_path / "admin_key").chmod(0o644)
    with pytest.raises(SettingsError, match="chmod 600"):
        Settings.from_env({"TAILOR_HOME": str(tmp_path)})


def test_serving_keeps_the_cores_training_does_not_use(tmp_path, monkeypatch):
    from service.state import serving_threads

    monkeypatch.setattr("service.state.available_cpus", lambda: 8)
    env = {"TAILOR_HOME": str(tmp_path / "home"), "TAILOR_ADMIN_KEY": "k" * 20, "TAILOR_WORKERS": "1"}
    assert serving_threads(Settings.from_env({**env, "TAILOR_TRAIN_WORKERS": "0"})) == 8
    assert serving_threads(Settings.from_env({**env, "TAILOR_TRAIN_WORKERS": "1"})) == 7
    assert serving_threads(Settings.from_env({**env, "TAILOR_TRAIN_WORKERS": "2", "TAILOR_TRAIN_THREADS": "3"})) == 2
    assert serving_threads(Settings.from_env({**env, "TAILOR_TRAIN_WORKERS": "0", "TAILOR_WORKERS": "3"})) == 2
    monkeypatch.setattr("service.state.available_cpus", lambda: 2)
    assert serving_threads(Settings.from_env({**env, "TAILOR_TRAIN_WORKERS": "4"})) == 1


@pytest.mark.parametrize("cpus, train_workers, given, cuda, workers, threads", [
    (2, "0", "auto", False, 2, 1),  # one single-threaded worker per core
    (2, "1", "", False, 1, 1),  # training keeps a core
    (4, "1", "", False, 3, 1),
    (32, "0", "auto", False, 4, 8),  # capped: the rest of the cores become threads
    (8, "0", "auto", True, 1, 8),  # one model copy per GPU
    (8, "0", "2", True, 2, 4),  # an explicit count always wins
])
def test_auto_workers(tmp_path, monkeypatch, cpus, train_workers, given, cuda, workers, threads):
    from service.state import serving_threads, serving_workers

    monkeypatch.setattr("service.state.available_cpus", lambda: cpus)
    monkeypatch.setattr("torch.cuda.is_available", lambda: cuda)
    s = Settings.from_env({"TAILOR_HOME": str(tmp_path / "home"), "TAILOR_ADMIN_KEY": "k" * 20,
                           "TAILOR_TRAIN_WORKERS": train_workers, "TAILOR_WORKERS": given})
    assert (serving_workers(s), serving_threads(s)) == (workers, threads)


def test_available_cpus_respects_the_affinity_mask():
    from service.state import available_cpus

    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {sorted(before)[0]})
        assert available_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert 1 <= available_cpus() <= len(before)


def test_runtime_and_quantisation(tmp_path):
    from adapters.runtime.onnx import runtime as onnx_runtime
    from service import settings as settings_module

    home = {"TAILOR_HOME": str(tmp_path)}
    s = Settings.from_env(home, admin_key=False)
    assert (s.runtime, s.quantize) == ("torch", "none")
    s = Settings.from_env({**home, "TAILOR_RUNTIME": " ONNX ", "TAILOR_QUANTIZE": "int8"}, admin_key=False)
    assert (s.runtime, s.quantize) == ("onnx", "int8")
    assert Settings.from_env({**home, "TAILOR_RUNTIME": "auto"}, admin_key=False).runtime == "auto"
    # the settings' lists are the runtime's (kept apart so reading settings imports no torch)
    assert settings_module.RUNTIMES == onnx_runtime.RUNTIMES and settings_module.QUANTIZE == onnx_runtime.QUANTIZE
    for name, value, words in [("TAILOR_RUNTIME", "tensorrt", "use one of torch, onnx, auto"),
                               ("TAILOR_QUANTIZE", "int4", "use one of none, int8")]:
        with pytest.raises(SettingsError, match=name) as e:
            Settings.from_env({**home, name: value}, admin_key=False)
        assert words in str(e.value)
