"""Adaptive chunking (Medha): prefill chunks sized so a step's predicted time stays within a budget.
The scheduler is driven with a stand-in step timer (no torch, no cost model): its rule is what the
scheduler must respect; the cost model itself is tested in test_cost_model.py."""

import pytest
from test_scheduler import BS, req, run_step

from csps.config import SchedulerConfig
from csps.core.kv_cache import BlockPool, KVCacheManager
from csps.core.scheduler import Scheduler
from csps.perf.step_timer import StepTimer


def fake_timer(prefills, decodes):
    """1 ms per new token, 1 µs per (new token × visible key), 0.1 ms per decode, 2 ms per step."""
    t = 2e-3 + 1e-4 * len(decodes)
    for n, c, s in prefills:
        t += 1e-3 * n / s + 1e-6 * n * (c + n / 2) / s
    return t


def make(budget=512, timer=fake_timer, **kw):
    kv = KVCacheManager(BlockPool(2000, BS, enable_prefix_caching=False))
    cfg = SchedulerConfig(token_budget=budget, max_num_seqs=32, max_model_len=16384, **kw)
    return Scheduler(cfg, kv, step_timer=timer)


def auto_budget(s, decodes):
    """The auto budget: the decodes plus the whole blocks of token budget they leave a fresh prompt."""
    left = s.cfg.token_budget - len(decodes)
    return fake_timer(((max(BS, left - left % BS), 0, 1),), decodes)


def prefill_chunks(s):
    """Run to completion; (start, tokens, predicted step s, budget s) of every step with a prefill."""
    seen = []
    while s.num_unfinished:
        out = run_step(s)
        if out.num_prefill_tokens:
            prefills, decodes = out.items(1)
            budget = auto_budget(s, decodes)
            seen.append((prefills, fake_timer(prefills, decodes), budget))
    return seen


def decoding(s, n=2):
    """Start n short requests and run until they all decode (they keep decoding for 200 steps)."""
    for i in range(n):
        s.add(req(100 + i, 20, max_tokens=200))
    while any(not r.output_token_ids for r in s.requests.values()):
        run_step(s)


def test_chunks_on_a_long_cache_shrink_to_the_budget_of_a_fresh_chunk():
    s = make()
    decoding(s)
    s.add(req(0, 6000, max_tokens=2))
    steps = prefill_chunks(s)
    sizes = [p[0][0] for p, _, _ in steps if p[0][0] > 1]
    assert sizes[0] == 496  # fresh: the whole token budget left by the two decodes (block-rounded)
    assert sizes == sorted(sizes, reverse=True) and sizes[-2] < 300  # shrinking as the cache grows
    assert all(n % BS == 0 for n in sizes[:-1]) and sum(sizes) == 6000
    for prefills, predicted, budget in steps:
        assert predicted <= budget * (1 + 1e-9)


def test_off_or_without_decodes_keeps_the_token_budget():
    for s in (make(adaptive_chunking=False), make()):
        s.add(req(0, 6000, max_tokens=2))
        sizes = [p[0][0] for p, _, _ in prefill_chunks(s)]
        assert sizes == [512] * 11 + [6000 - 11 * 512]  # nobody waits for a token: whole chunks


def test_a_fixed_budget_and_the_progress_guarantee():
    s = make(step_time_budget_ms=100.0)
    decoding(s)
    s.add(req(0, 3000, max_tokens=2))
    steps = [(p, t) for p, t, _ in prefill_chunks(s) if p[0][0] > 1]
    assert len(steps) > 6
    for prefills, predicted in steps:
        assert predicted <= 0.1 or prefills[0][0] == BS  # over budget only with the minimum chunk
    tiny = make(step_time_budget_ms=0.5)  # not even one block fits: one block per step anyway
    decoding(tiny)
    tiny.add(req(1, 100, max_tokens=1))
    assert [p[0][0] for p, _, _ in prefill_chunks(tiny) if p[0][0] > 1] == [16] * 6 + [4]


def test_decodes_are_never_dropped_and_a_second_prefill_may_wait():
    s = make()
    for i in range(4):
        s.add(req(i, 40, max_tokens=30))
    while any(not r.output_token_ids for r in s.requests.values()):
        run_step(s)
    s.add(req(9, 8000, max_tokens=2))
    s.add(req(10, 5000, max_tokens=2))
    decoding = {f"r{i}" for i in range(4)}
    for _ in range(10):
        out = run_step(s)
        assert decoding <= {c.req_id for c in out.chunks if c.is_decode} | (decoding - set(s.requests))
        prefills, decodes = out.items(1)
        assert fake_timer(prefills, decodes) <= auto_budget(s, decodes) * (1 + 1e-9) or len(prefills) == 1


def test_step_timer_learns_a_constant_factor_from_measured_steps():
    from csps.perf.hardware import get_profile
    from csps.presets import preset_config

    timer = StepTimer(preset_config("llama3-8b"), get_profile("h100"), 2)
    shape = (((512, 4096, 1),), ((600, 1),) * 8)
    raw = timer(*shape)
    timer.observe((), shape[1], 10 * raw)  # decode-only steps do not count
    assert timer.correction == 1.0
    for _ in range(30):
        timer.observe(*shape, 2.5 * raw)
    assert timer(*shape) == pytest.approx(2.5 * raw, rel=1e-3)


def test_step_timer_learns_attention_and_the_rest_apart():
    """A machine whose attention over a long cache costs half what the profile says and whose GEMMs cost twice:
    one factor cannot predict both a fresh chunk and a chunk on a long cache; the two-term fit does."""
    from csps.perf.hardware import get_profile
    from csps.presets import preset_config

    timer = StepTimer(preset_config("llama3-8b"), get_profile("h100"), 2)
    fresh = (((512, 0, 1),), ((600, 1),) * 8)
    long_cache = (((256, 60000, 1),), ((600, 1),) * 8)
    truth = {s: 0.5 * timer.parts_s(*s)[0] + 2.0 * timer.parts_s(*s)[1] for s in (fresh, long_cache)}
    single = {s: truth[s] / timer.raw_s(*s) for s in truth}
    assert abs(single[fresh] - single[long_cache]) > 0.3  # the two shapes need different single factors
    for _ in range(20):
        for s in (fresh, long_cache):
            timer.observe(*s, truth[s])
    for s in truth:
        assert timer(*s) == pytest.approx(truth[s], rel=0.05)
    # (the ridge holds both a little towards the single ratio)
    assert 0.45 < timer.attn_correction < 0.7 and 1.8 < timer.rest_correction < 2.1
