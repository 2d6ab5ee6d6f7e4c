"""max_tokens 0: a prefill-only request (a warm-up) computes its prompt into the prefix cache and finishes
with no token, without sampling; the requests that share its prefix then start from the cache."""

import pytest
import torch

from csps import LLM, SamplingParams
from csps.config import SchedulerConfig
from csps.core.kv_cache import BlockPool, KVCacheManager
from csps.core.request import Request
from csps.core.scheduler import Scheduler
from csps.errors import RequestError

BS = 16
GREEDY = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
WARM = SamplingParams(max_tokens=0)


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(3, 49000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=256, seed=0)


def test_sampling_params_take_zero_but_not_less():
    assert SamplingParams(max_tokens=0).max_tokens == 0
    with pytest.raises(RequestError, match="max_tokens must be >= 0"):
        SamplingParams(max_tokens=-1)


def test_the_scheduler_never_marks_a_prefill_only_chunk_for_sampling():
    kv = KVCacheManager(BlockPool(64, BS))
    s = Scheduler(SchedulerConfig(token_budget=64, max_num_seqs=8, max_model_len=4096), kv)
    warm = Request("w", list(range(3, 3 + 100)), SamplingParams(max_tokens=0), 0.0)
    other = Request("o", list(range(500, 520)), SamplingParams(max_tokens=2), 0.0)
    s.add(warm)
    s.add(other)
    seen = []
    for _ in range(4):
        out = s.schedule()
        s.complete_step(out)
        seen += [c for c in out.chunks if c.req_id == "w"]
        if warm.num_missing_tokens == 0:
            break
    assert sum(c.num_tokens for c in seen) == 100 and seen[-1].start + seen[-1].num_tokens == 100
    assert not any(c.samples for c in seen)
    assert not warm.wants_token and other.wants_token


def test_warm_up_finishes_with_no_token_and_samples_nothing(llm):
    p = tokens(150, seed=1)
    llm.engine.logits_sink = {}
    try:
        (out,) = llm.generate([p], WARM, use_tqdm=False)
        rid = out.request_id
        sampled = dict(llm.engine.logits_sink)
    finally:
        llm.engine.logits_sink = None
    assert out.finished and out.finish_reason == "length"
    assert out.token_ids == [] and out.text == "" and out.num_prompt_tokens == 150
    assert out.metrics.token_times_s == [] and out.metrics.finished_s is not None
    assert rid not in sampled, "a prefill-only request must not be sampled"
    assert llm.engine.pools[0].num_used == 0 and not llm.engine.has_unfinished()


def test_the_next_request_sharing_the_prefix_is_served_from_the_cache(llm):
    context = tokens(300, seed=2)
    (warm,) = llm.generate([context], WARM, use_tqdm=False)
    assert warm.num_cached_tokens == 0
    longer = context + tokens(40, seed=3)
    (hit,) = llm.generate([longer], GREEDY, use_tqdm=False)
    assert hit.num_cached_tokens == 288  # every full block of the warm-up's prompt (18 x 16)
    cold = LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=256, seed=0, enable_prefix_caching=False)
    assert cold.generate([longer], GREEDY, use_tqdm=False)[0].token_ids == hit.token_ids


def test_warm_ups_batched_with_generating_requests_change_nothing(llm):
    ps = [tokens(n, seed=10 + n) for n in (30, 70, 130)]
    alone = [o.token_ids for o in llm.generate(ps, GREEDY, use_tqdm=False)]
    mixed = llm.generate([ps[0], tokens(90, 20), ps[1], tokens(200, 21), ps[2]],
                         [GREEDY, WARM, GREEDY, WARM, GREEDY], use_tqdm=False)
    assert [o.token_ids for o in mixed[::2]] == alone
    assert [o.token_ids for o in mixed[1::2]] == [[], []]
    assert all(o.finish_reason == "length" for o in mixed)
