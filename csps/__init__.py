"""csps: long-context LLM serving with chunked prefills, stall-free batching and sequence parallelism."""

from csps.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
)
from csps.core.sampling_params import SamplingParams
from csps.errors import CspsError, RequestError


def __getattr__(name: str):
    # LLM pulls in torch and transformers: import it lazily so `import csps` stays light
    if name == "LLM":
        from csps.llm import LLM

        return LLM
    if name == "RequestOutput":
        from csps.engine.outputs import RequestOutput

        return RequestOutput
    raise AttributeError(name)


__all__ = [
    "LLM",
    "SamplingParams",
    "RequestOutput",
    "EngineConfig",
    "ModelConfig",
    "CacheConfig",
    "SchedulerConfig",
    "ParallelConfig",
    "CspsError",
    "RequestError",
]
