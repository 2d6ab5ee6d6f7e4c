"""Prefill progress as the engine process reports it, from the scheduler's requests (no engine needed)."""

from csps.core.request import Request, Status
from csps.core.sampling_params import SamplingParams
from csps.server.prompt_progress import PromptProgress, progress_body


def test_reports_what_moved_until_the_prompt_is_computed():
    req = Request("r", list(range(100)), SamplingParams(max_tokens=3), arrival_s=0.0)
    p = PromptProgress()
    p.watch("r", req)
    assert p.updates(now_s=1.0) == []  # not scheduled yet
    req.metrics.first_scheduled_s = 1.0
    req.num_cached_tokens = req.num_computed_tokens = 32  # admitted with a prefix-cache hit ...
    req.num_computed_tokens = 64  # ... and its first chunk computed
    (a,) = p.updates(now_s=1.5)
    assert a == {"rid": "r", "progress": {"total": 100, "cached": 32, "processed": 64, "time_ms": 500.0}}
    assert p.updates(now_s=1.6) == []  # nothing moved
    req.num_computed_tokens = 101  # the prompt and the first sampled token: processed stops at the prompt
    (b,) = p.updates(now_s=2.0)
    assert b["progress"]["processed"] == 100 and b["progress"]["time_ms"] == 1000.0
    assert not p.watched  # done: no more reports


def test_finished_or_forgotten_requests_are_dropped():
    a = Request("a", [1] * 10, SamplingParams(max_tokens=1), arrival_s=0.0)
    b = Request("b", [1] * 10, SamplingParams(max_tokens=1), arrival_s=0.0)
    p = PromptProgress()
    p.watch("a", a)
    p.watch("b", b)
    a.status = Status.FINISHED_ABORTED
    p.forget("b")
    assert p.updates(now_s=1.0) == [] and not p.watched


def test_the_api_body_has_llama_cpps_name_too():
    item = {"rid": "r", "progress": {"total": 9, "cached": 4, "processed": 6, "time_ms": 1.5}}
    assert progress_body(item) == {"total": 9, "cached": 4, "cache": 4, "processed": 6, "time_ms": 1.5}
    assert progress_body(item, index=2)["index"] == 2
