"""Serving runtime: resident cache, device slots and the mixed-tenant forward pass."""

from adapters.runtime.cache import ResidentCache
from adapters.runtime.engine import BatchOutput, Engine, EngineConfig, Prediction, ResolvedAdapter
from adapters.runtime.loaded import LoadedAdapter, VersionKey
from adapters.runtime.slots import SlotBank

__all__ = [
    "BatchOutput", "Engine", "EngineConfig", "LoadedAdapter", "Prediction", "ResidentCache",
    "ResolvedAdapter", "SlotBank", "VersionKey",
]
