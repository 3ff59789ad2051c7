"""What a deployment asks of the forward pass: ``RuntimeChoice(runtime, quantize)``.

``runtime``: ``torch``, ``onnx`` or ``auto`` (ONNX on a CPU base that exports, torch on CUDA);
``quantize``: ``none`` or ``int8`` (ONNX only: the base's weight matmuls in int8, LoRA and heads
fp32). Bad values raise ``ValueError`` naming the choices. Light: imports no ONNX Runtime, so
the worker's and the service's settings can carry it; ``adapters.runtime.onnx.runtime`` applies it.
"""

from __future__ import annotations

from dataclasses import dataclass

RUNTIMES = ("torch", "onnx", "auto")
QUANTIZE = ("none", "int8")


@dataclass(frozen=True)
class RuntimeChoice:
    runtime: str = "torch"
    quantize: str = "none"

    def __post_init__(self) -> None:
        if self.runtime not in RUNTIMES:
            raise ValueError(f"unknown runtime {self.runtime!r}; use one of {', '.join(RUNTIMES)}")
        if self.quantize not in QUANTIZE:
            raise ValueError(f"unknown quantisation {self.quantize!r}; use one of {', '.join(QUANTIZE)}")

    @property
    def precision(self) -> str:
        return "int8" if self.quantize == "int8" else "fp32"
