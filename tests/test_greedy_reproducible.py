"""Greedy decoding is reproducible in fp32 on the real default model: the same request gives the same
tokens cached or uncached, alone or in a batch of 32, at SP 1 and SP 2 (a first difference counts
only where the reference's top-2 logit margin is at least 1e-3, see ``greedy.py``)."""

import os

import pytest
import torch
import sp_harness
from greedy import first_real_divergence

from csps.engine.weights import load_model_weights

pytestmark = pytest.mark.slow

BOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                    "shared", "data", "books", "pride_and_prejudice.txt")
NUM_PROMPTS = 32


@pytest.fixture(scope="module")
def setup(smollm2_tokenizer):
    with open(BOOK, encoding="utf-8") as f:
        ids = smollm2_tokenizer.encode(f.read()[20_000:60_000])
    # 32 prompts of 24..210 tokens; every fourth shares a 96-token prefix with the one before it
    prompts = []
    for i in range(NUM_PROMPTS):
        start = prompts[-1][0] if i % 4 == 3 else 250 * i
        prompts.append((start, 24 + (i * 37) % 187 + (96 if i % 4 == 3 else 0)))
    prompts = [ids[a : a + n] for a, n in prompts]
    return load_model_weights("smollm2", torch.float32), prompts


KW = dict(token_budget=256, num_blocks=600, max_model_len=1024)


def run(weights, waves, **kw):
    """waves: lists of (req_id, ids) run together; tokens, logits and cached counts by request id."""
    r = sp_harness.run(weights, waves, **KW, **kw)
    return r.tokens, r.logits, r.cached


@pytest.fixture(scope="module")
def alone(setup):
    """The oracle: every request on its own, no prefix cache."""
    weights, prompts = setup
    return run(weights, [[(f"r{i}", p)] for i, p in enumerate(prompts)], enable_prefix_caching=False)


def check(alone, tokens, ids=None):
    ref_tokens, ref_logits, _ = alone
    bad = {}
    for rid in ids or ref_tokens:
        why = first_real_divergence(ref_tokens[rid], ref_logits[rid], tokens[rid])
        if why:
            bad[rid] = why
    assert not bad, bad


def test_a_batch_of_32_gives_the_tokens_of_each_request_alone(setup, alone):
    weights, prompts = setup
    tokens, _, _ = run(weights, [[(f"r{i}", p) for i, p in enumerate(prompts)]], enable_prefix_caching=False)
    check(alone, tokens)


def test_prefix_cached_requests_give_the_uncached_tokens(setup, alone):
    weights, prompts = setup
    # first every request once, then all again: the second time their prompts come from the cache
    first = [(f"r{i}", p) for i, p in enumerate(prompts)]
    tokens, _, cached = run(weights, [first, [(f"again{i}", p) for i, p in enumerate(prompts)]])
    check(alone, tokens)
    check(alone, {f"r{i}": tokens[f"again{i}"] for i in range(NUM_PROMPTS)})
    assert all(cached[f"again{i}"] >= 16 for i in range(NUM_PROMPTS))
    assert sum(cached[f"r{i}"] > 0 for i in range(3, NUM_PROMPTS, 4)) >= 4  # shared prefixes hit too


def test_sp2_batch_gives_the_single_process_tokens(setup, alone):
    weights, prompts = setup
    # prompts above 128 tokens are sequence-parallel, the rest live on one rank
    tokens, _, _ = run(weights, [[(f"r{i}", p) for i, p in enumerate(prompts)]], sp=2, sp_threshold_tokens=128)
    check(alone, tokens)


def test_the_divergence_check_tells_ties_from_real_differences():
    logits = torch.zeros(3, 10)
    logits[:, 4] = 1.0
    logits[1, 5] = 1.0 - 1e-5  # step 1 is a near-tie between tokens 4 and 5
    assert first_real_divergence([4, 4, 4], logits, [4, 4, 4]) is None
    assert first_real_divergence([4, 4, 4], logits, [4, 5, 7]) is None  # differs first at the tie
    assert "token 0" in first_real_divergence([4, 4, 4], logits, [5, 4, 4])
    assert "2 tokens" in first_real_divergence([4, 4, 4], logits, [4, 4])
