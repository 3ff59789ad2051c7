"""Per-tenant quotas: stored as JSON on the tenant row, defaults for anything unset.

``TenantQuotas.from_dict`` validates an operator's input (unknown keys and bad values are
errors naming the key); ``dataset_limits`` turns the quotas into the limits a dataset is
checked against at upload and at job submission.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from adapters.datasets import DatasetLimits
from adapters.errors import TailorError


class QuotaError(TailorError, ValueError):
    code = "invalid_quota"


@dataclass(frozen=True)
class TenantQuotas:
    max_adapters: int = 100
    max_training_rows: int = 50_000
    max_labels: int = 100
    min_examples_per_label: int = 2
    max_concurrent_jobs: int = 1  # running at once
    max_active_jobs: int = 10  # queued + running
    requests_per_second: float = 0.0  # 0 = no rate limit for this tenant

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> TenantQuotas:
        if d is None:
            return cls()
        if not isinstance(d, dict):
            raise QuotaError("quotas must be an object", param="quotas")
        known = {f.name: f for f in fields(cls)}
        values: dict[str, Any] = {}
        for key, value in d.items():
            if key not in known:
                raise QuotaError(f"unknown quota {key!r}; known: {', '.join(known)}", param=f"quotas.{key}")
            want = float if known[key].type in ("float", float) else int
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not ok or value < 0 or (want is int and int(value) != value):
                raise QuotaError(f"quota {key!r} must be a non-negative {want.__name__}", param=f"quotas.{key}")
            values[key] = want(value)
        for key in ("max_training_rows", "max_labels", "min_examples_per_label"):
            if values.get(key, 1) < 1:
                raise QuotaError(f"quota {key!r} must be at least 1", param=f"quotas.{key}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def dataset_limits(self) -> DatasetLimits:
        return DatasetLimits(max_rows=self.max_training_rows, max_labels=self.max_labels,
                             min_examples_per_label=self.min_examples_per_label)
