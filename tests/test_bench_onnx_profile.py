"""bench.onnx_profile on a tiny base: every graph is timed and profiled on the engine's own
inputs, the op types add up to the profiled total, and the ceiling lies above the measured
ratio exactly when the graph has int8 GEMMs; the kernel probe runs each product."""

from __future__ import annotations

import json
import sys

import pytest

from adapters.base import tiny_base
from bench import onnx_profile


def test_profile_splits_each_graph_by_op_type_and_bounds_int8(tmp_path):
    result = onnx_profile.profile(tiny_base(seed=3), ("per-token-smooth-keep-ffn-out",), tmp_path,
                                  tmp_path / "graphs", rounds=2, threads=1)
    graphs = result["graphs"]
    assert set(graphs) == {"fp32", "int8:per-token-smooth-keep-ffn-out"}
    for label, g in graphs.items():
        assert g["profiled_kernel_ms"] == pytest.approx(sum(g["by_op_ms"].values()))
        assert g["profiled_kernel_ms"] == pytest.approx(sum(g["by_category_ms"].values()))
        assert g["ratio_vs_torch"] == pytest.approx(result["torch_ms"] / g["wall_ms"])
    assert "int8_gemm" not in graphs["fp32"]["by_category_ms"]
    assert graphs["fp32"]["ceiling_vs_torch"] == pytest.approx(graphs["fp32"]["ratio_vs_torch"])
    int8 = graphs["int8:per-token-smooth-keep-ffn-out"]
    assert int8["by_category_ms"]["int8_gemm"] > 0 and int8["by_op_ms"]["MatMulIntegerToFloat"] > 0
    assert int8["ceiling_vs_torch"] > int8["ratio_vs_torch"]


def test_kernel_rates_time_every_product():
    k = onnx_profile.kernel_rates(1, rounds=1, m=64, k=32, n=48)
    assert set(k["ms"]) == set(k["gop_per_s"]) == {
        "onnx fp32 MatMul", "onnx MatMulIntegerToFloat u8 x s8", "onnx MatMulIntegerToFloat u8 x u8", "torch fp32 matmul"}
    assert all(v > 0 for v in k["gop_per_s"].values())


def test_the_command_writes_json_and_a_plot(tmp_path, monkeypatch):
    monkeypatch.setattr("adapters.base.load_base", lambda: tiny_base(seed=3))
    rates = onnx_profile.kernel_rates
    monkeypatch.setattr(onnx_profile, "kernel_rates", lambda threads, rounds: rates(threads, rounds=1, m=64, k=32, n=48))
    out = tmp_path / "profile.json"
    monkeypatch.setattr(sys, "argv", ["bench.onnx_profile", "--quick", "--threads", "1", "--out", str(out)])
    onnx_profile.main()
    result = json.loads(out.read_text())
    assert result["quick"] and set(result["graphs"]) == {"fp32", "int8:per-token-smooth-keep-ffn-out", "int8:per-token-smooth"}
    assert result["kernels"]["shape"] == [64, 32, 48] and out.with_suffix(".png").stat().st_size > 0
