"""bench.engine's harness on tiny bases: every method runs, Tailor's mixed rows equal peft's,
and the command writes its JSON and plot (the real bases only run in the benchmark itself)."""

from __future__ import annotations

import json
import sys
from dataclasses import replace

from adapters.vision.backbone import tiny_vision_base
from bench import engine, engine_image
from bench.engine import METHODS, run


IMAGE_WORKLOAD = engine_image.image_workload


def tiny_image_workload(quick: bool = True) -> engine.Workload:
    w = IMAGE_WORKLOAD(quick=quick, base=tiny_vision_base(seed=1))
    return replace(w, rounds=1, n_registered=6, n_memory=4, counts=(1, 3))


def test_every_method_runs_and_mixed_rows_equal_peft_on_a_tiny_image_base(tmp_path):
    result = run(tiny_image_workload(), tmp_path)
    assert set(result["rows_per_s"]) == set(METHODS)
    assert all(set(per_k) == {"1", "3"} for per_k in result["rows_per_s"].values())
    assert result["peft_mixed"] == {"supported": True}  # peft runs Conv2d LoRA in mixed batches
    assert result["max_abs_diff_vs_peft"] <= 1e-4
    assert set(result["ratio_vs_base"]) == set(result["paired_ratio"]["vs_base"]) == {"1", "3"}
    assert result["cold_load_ms"]["registered"] == 6 and result["adapter_file_bytes"] > 0
    assert 0 < result["lora_macs"]["fraction_of_base"] < 1
    assert result["batch"]["rows"] == {"1": 32, "3": 32}


def test_the_command_writes_json_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setattr(engine_image, "image_workload", lambda quick: tiny_image_workload(quick))
    out = tmp_path / "engine-image.json"
    monkeypatch.setattr(sys, "argv", ["bench.engine", "--task", "image", "--quick", "--out", str(out)])
    engine.main()
    result = json.loads(out.read_text())
    assert result["task"] == "image" and result["quick"] is True and out.with_suffix(".png").stat().st_size > 0


def test_an_unsupported_peft_mixed_batch_is_reported_not_fatal(tmp_path):
    w = tiny_image_workload()

    def call(model, batch, **kw):
        if "adapter_names" in kw:
            raise ValueError("mixed batches are not supported for this model")
        return w.call(model, batch, **kw)

    result = run(replace(w, call=call), tmp_path)
    assert result["peft_mixed"]["supported"] is False and "not supported" in result["peft_mixed"]["error"]
    assert result["rows_per_s"]["peft_mixed"] == {} and result["ratio_vs_peft_mixed"] == {}
    assert result["max_abs_diff_vs_peft"] <= 1e-4  # against peft one row at a time instead


def test_the_text_workload_runs_on_a_tiny_text_base(tmp_path):
    from adapters.base import tiny_base

    w = replace(engine.text_workload(quick=True, base=tiny_base(seed=1)), rounds=1, n_registered=3, n_memory=3,
                counts=(1, 2))
    result = run(w, tmp_path)
    assert result["peft_mixed"] == {"supported": True} and result["max_abs_diff_vs_peft"] <= 1e-4
    assert set(result["rows_per_s"]["naive_swap"]) == {"1", "2"} and result["batch"]["tokens"] == 64
    # the ONNX Runtime rows (bench.engine_onnx): timed on the same batches, fp32 equal to torch
    assert all(set(result["rows_per_s"][m]) == {"1", "2"} for m in ("onnx_base", "onnx_fp32", "onnx_int8"))
    onnx = result["onnx"]
    assert max(p["fp32"]["max_abs_diff"] for p in onnx["parity_vs_torch"].values()) <= 1e-4
    assert onnx["graphs"]["fp32"]["graph_bytes"] > 0 and onnx["graphs"]["int8"]["first_start_seconds"] > 0
    assert set(onnx["paired_ratios"]["2"]) >= {"onnx_int8_vs_tailor", "onnx_fp32_vs_onnx_base"}
    assert onnx["slot_bank_in_graph"]["max_abs_diff_pooled"] <= 1e-5  # the variant measured computes the same
