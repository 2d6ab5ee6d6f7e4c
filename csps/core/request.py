"""The scheduler's view of a request (pure Python, no torch).

vLLM's "computed tokens catch up" model: a request has ``num_tokens`` known tokens (prompt +
generated) of which ``num_computed_tokens`` have KV in the cache. A step schedules some of the
missing ones; when all are computed, the model samples the next token. One rule covers chunked
prefill, decode, prefix-cache hits and resumption after preemption.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from csps.core.sampling_params import RequestMetrics, SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


@dataclass(eq=False)
class Request:
    req_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_s: float
    output_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache at admission
    num_preemptions: int = 0
    status: Status = Status.WAITING
    owner_rank: int = 0  # rank that holds the request's new tokens (sequence-parallel: all ranks)
    sp_degree: int = 1  # > 1: the request's prefill is split over the SP ranks
    metrics: RequestMetrics = field(init=False)

    def __post_init__(self) -> None:
        self.metrics = RequestMetrics(arrival_s=self.arrival_s)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_missing_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def wants_token(self) -> bool:
        """Its output budget is not spent: once all known tokens are computed the model samples the next
        one (False from the start for a prefill-only request, max_tokens 0)."""
        return len(self.output_token_ids) < self.params.max_tokens

    @property
    def is_decode(self) -> bool:
        """Only the newest token lacks KV: one token per step."""
        return self.num_missing_tokens == 1 and bool(self.output_token_ids)

    def token_ids(self, start: int, end: int) -> list[int]:
        p = len(self.prompt_token_ids)
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p : end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[: end - p]

    def token_at(self, pos: int) -> int:
        p = len(self.prompt_token_ids)
        return self.prompt_token_ids[pos] if pos < p else self.output_token_ids[pos - p]
