"""Engine behaviour on a random-weight model: batching, preemption, prefix caching, sampling, stops."""

import pytest
import torch

from csps import LLM, SamplingParams
from csps.errors import RequestError

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def prompts(n, lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 49000, (lens[i % len(lens)],), generator=g).tolist() for i in range(n)]


@pytest.fixture(scope="module")
def llm():
    return LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=256, seed=0)


def test_batch_equals_each_alone(llm):
    ps = prompts(6, [5, 90, 17, 200, 33, 64])
    batched = llm.generate(ps, GREEDY, use_tqdm=False)
    for p, b in zip(ps, batched):
        alone = llm.generate([p], GREEDY, use_tqdm=False)[0]
        assert alone.token_ids == b.token_ids
        assert len(b.token_ids) == 24 and b.finish_reason == "length"


def test_preempted_requests_give_the_same_tokens(llm):
    ps = prompts(5, [40, 60, 30, 50, 45], seed=1)
    ref = llm.generate(ps, GREEDY, use_tqdm=False)
    small = LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=14, seed=0,
                enable_prefix_caching=False)
    got = small.generate(ps, GREEDY, use_tqdm=False)
    assert sum(o.num_preemptions for o in got) > 0, "the small pool must force preemption"
    assert [o.token_ids for o in got] == [o.token_ids for o in ref]
    assert small.engine.pools[0].num_used == 0


def test_prefix_cache_hit_same_tokens_fewer_computed(llm):
    shared = prompts(1, [300], seed=2)[0]
    a, b = shared + [11, 12, 13], shared + [21, 22]
    first = llm.generate([a], GREEDY, use_tqdm=False)[0]
    second = llm.generate([b], GREEDY, use_tqdm=False)[0]
    assert first.num_cached_tokens == 0  # nothing before it shared its prompt
    assert second.num_cached_tokens == 288  # 18 full blocks of 16
    nocache = LLM("dummy:tiny", dtype="float32", token_budget=64, num_blocks=256, seed=0,
                  enable_prefix_caching=False)
    assert nocache.generate([b], GREEDY, use_tqdm=False)[0].token_ids == second.token_ids


def test_seeded_sampling_is_reproducible_and_varies(llm):
    p = prompts(1, [20], seed=3)[0]
    sp = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=42, ignore_eos=True)
    a = llm.generate([p], sp, use_tqdm=False)[0].token_ids
    b = llm.generate([p, p], [sp, SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)],
                     use_tqdm=False)
    assert a == b[0].token_ids
    assert a != b[1].token_ids


def test_logprobs_and_penalties(llm):
    p = prompts(1, [20], seed=4)[0]
    out = llm.generate([p], SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True),
                       use_tqdm=False)[0]
    assert len(out.logprobs) == 5
    for lp, tok in zip(out.logprobs, out.token_ids):
        assert lp.token_id == tok and lp.logprob <= 0 and len(lp.top) == 3
        assert lp.top[0][0] == tok  # greedy picks the top token
    pen = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, repetition_penalty=5.0,
                                           ignore_eos=True), use_tqdm=False)[0]
    plain = llm.generate([p], GREEDY, use_tqdm=False)[0]
    assert len(set(pen.token_ids)) > len(set(plain.token_ids))


def test_stop_strings_and_stop_tokens(llm):
    p = prompts(1, [20], seed=5)[0]
    full = llm.generate([p], GREEDY, use_tqdm=False)[0]
    stop_tok = full.token_ids[5]
    o = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop_tok],
                                         ignore_eos=True), use_tqdm=False)[0]
    assert o.finish_reason == "stop" and o.token_ids == full.token_ids[: full.token_ids.index(stop_tok) + 1]
    assert o.stop_reason == stop_tok
    text = full.text
    # a stop string from the second half of the text, starting at a non-space character
    start = next(i for i in range(len(text) // 2, len(text) - 3) if text[i].strip())
    stop = text[start : start + 3]
    s = llm.generate([p], SamplingParams(max_tokens=24, temperature=0, stop=[stop], ignore_eos=True),
                     use_tqdm=False)[0]
    assert s.finish_reason == "stop" and stop not in s.text and text.startswith(s.text)
    assert len(s.text) <= start


def test_streaming_deltas_add_up(llm):
    e = llm.engine
    p = prompts(1, [20], seed=6)[0]
    rid = e.add_request(p, GREEDY)
    text, ids, final = "", [], None
    while e.has_unfinished():
        for o in e.step():
            assert o.request_id == rid
            text += o.new_text
            ids += o.new_token_ids
            final = o
    assert final.finished and text == final.text and ids == final.token_ids
    m = final.metrics
    assert m.ttft_s > 0 and len(m.tbt_s) == 23 and all(t >= 0 for t in m.tbt_s)


def test_abort_frees_blocks(llm):
    e = llm.engine
    before = e.pools[0].num_used
    rid = e.add_request(prompts(1, [100], seed=7)[0], SamplingParams(max_tokens=100, ignore_eos=True))
    e.step()
    e.step()
    assert e.pools[0].num_used > before
    assert e.abort(rid)
    assert e.pools[0].num_used == before and not e.has_unfinished()
    assert not e.abort(rid)


def test_bad_requests_are_refused(llm):
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]], GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match="context"):
        llm.generate([[5] * 9000], GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match="vocabulary"):
        llm.generate([[10**6]], GREEDY, use_tqdm=False)
    with pytest.raises(RequestError, match="max_tokens"):
        SamplingParams(max_tokens=-1)  # 0 is a prefill-only warm-up (test_prefill_only.py)
    with pytest.raises(RequestError, match="top_p"):
        SamplingParams(top_p=0)


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], SamplingParams(max_tokens=3, temperature=0))
    tok = llm.get_tokenizer()
    assert out[0].prompt_token_ids[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
