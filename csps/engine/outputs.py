"""Per-request output state: detokenization, stop conditions, streaming deltas, final results."""

from __future__ import annotations

from dataclasses import dataclass, field

from csps.core.request import Request, Status
from csps.core.sampling_params import RequestMetrics
from csps.engine.sampler import Sampled
from csps.engine.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """One request's state after a step. ``token_ids`` and ``text`` (everything so far) are cut from the
    request's growing output only when read, so a step's outputs cost the same at token 10 and 10,000."""

    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]  # generated in this step
    new_text: str  # text released in this step (stream this)
    finished: bool
    finish_reason: str | None  # stop | length | abort
    stop_reason: str | int | None
    logprobs: list[TokenLogprob] | None
    metrics: RequestMetrics
    num_cached_tokens: int = 0
    num_preemptions: int = 0
    _all_ids: list[int] = field(default_factory=list, repr=False)  # the request's output list (only grows)
    _num_ids: int = 0
    _all_text: str = ""
    _text_end: int = 0

    @property
    def token_ids(self) -> list[int]:
        """All tokens generated so far."""
        return self._all_ids[: self._num_ids]

    @property
    def text(self) -> str:
        """All text generated so far (a stop string removed)."""
        return self._all_text[: self._text_end]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)


class OutputState:
    """Tracks one request's text and decides when it stops."""

    def __init__(self, req: Request, tokenizer: Tokenizer | None, eos_ids: set[int], max_model_len: int) -> None:
        self.req = req
        self.detok = IncrementalDetokenizer(tokenizer) if tokenizer is not None else None
        self.eos_ids = set() if req.params.ignore_eos else eos_ids
        self.max_model_len = max_model_len
        self.text = ""  # text so far, stop string cut off at finish
        self.num_emitted_chars = 0
        self.num_emitted_tokens = 0
        self.logprobs: list[TokenLogprob] | None = [] if req.params.logprobs is not None else None
        self.holdback = max((len(s) for s in req.params.stop), default=1) - 1
        self.stop_reason: str | int | None = None

    def add_token(self, s: Sampled) -> Status | None:
        """Record a sampled token; return the finished status if the request must stop."""
        req, p = self.req, self.req.params
        req.output_token_ids.append(s.token_id)
        if self.logprobs is not None:
            self.logprobs.append(TokenLogprob(s.token_id, s.logprob or 0.0, s.top_logprobs))
        if s.token_id in self.eos_ids:
            self.stop_reason = None
            return Status.FINISHED_STOPPED
        if s.token_id in p.stop_token_ids:
            self.stop_reason = s.token_id
            return Status.FINISHED_STOPPED
        if self.detok is not None:
            delta = self.detok.add(s.token_id)
            if delta:
                start = max(0, len(self.text) - self.holdback)
                self.text += delta
                for stop in p.stop:
                    at = self.text.find(stop, start)
                    if at >= 0:
                        self.text = self.text[: at + (len(stop) if p.include_stop_str_in_output else 0)]
                        self.stop_reason = stop
                        return Status.FINISHED_STOPPED
        if len(req.output_token_ids) >= p.max_tokens or req.num_tokens >= self.max_model_len:
            return Status.FINISHED_LENGTH
        return None

    def make_output(self, finished: bool, status: Status | None) -> RequestOutput:
        req = self.req
        end = len(self.text) if finished else max(self.num_emitted_chars, len(self.text) - self.holdback)
        new_text = self.text[self.num_emitted_chars : end]
        self.num_emitted_chars = end
        new_ids = req.output_token_ids[self.num_emitted_tokens :]
        self.num_emitted_tokens = len(req.output_token_ids)
        return RequestOutput(
            request_id=req.req_id,
            prompt_token_ids=req.prompt_token_ids,
            _all_ids=req.output_token_ids,
            _num_ids=len(req.output_token_ids),
            _all_text=self.text,
            _text_end=len(self.text) if finished else end,
            new_token_ids=list(new_ids),
            new_text=new_text,
            finished=finished,
            finish_reason=status.value if (finished and status is not None) else None,
            stop_reason=self.stop_reason,
            logprobs=self.logprobs,
            metrics=req.metrics,
            num_cached_tokens=req.num_cached_tokens,
            num_preemptions=req.num_preemptions,
        )
