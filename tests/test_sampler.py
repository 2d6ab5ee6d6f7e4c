"""The sampler: distributions, filters, penalties, seeds; the batched sampler against the per-row rules
of ``sampler_ref`` (its oracle)."""

import pytest
import torch

from csps.core.sampling_params import SamplingParams
from csps.engine import sampler_ref
from csps.engine.sampler import RequestSampler, SampleRow, apply_penalties, filter_logits, sample


def draw(logits, params, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [SampleRow(params, [], [], RequestSampler(g)) for _ in range(n)]
    return torch.tensor([s.token_id for s in sample(logits.expand(n, -1).clone(), rows)])


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.bincount(draw(logits, SamplingParams(temperature=1.0)), minlength=4).float() / 4000
    assert (counts - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03
    # unseeded rows draw from the engine's generator in one batched call: the same distribution
    rows = [SampleRow(SamplingParams(temperature=1.0), [], []) for _ in range(4000)]
    unseeded = torch.tensor([s.token_id for s in sample(logits.expand(4000, -1).clone(), rows)])
    counts = torch.bincount(unseeded, minlength=4).float() / 4000
    assert (counts - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03


def test_tokens_of_probability_zero_are_never_drawn():
    # masked tokens at the start, the middle and the end of the vocabulary (inverse-CDF edges)
    logits = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0, float("-inf")]])
    rows = [SampleRow(SamplingParams(temperature=1.0), [], []) for _ in range(3000)]
    got = torch.tensor([s.token_id for s in sample(logits.expand(3000, -1).clone(), rows)])
    counts = torch.bincount(got, minlength=5)
    assert counts[0] == counts[2] == counts[4] == 0 and abs(int(counts[1]) - 1500) < 150


def test_temperature_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert set(draw(logits, SamplingParams(top_k=2), n=500).tolist()) <= {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.7), n=500).tolist()) <= {0, 1}
    assert set(draw(logits, SamplingParams(min_p=0.2), n=500).tolist()) <= {0, 1, 2}
    cold = torch.bincount(draw(logits, SamplingParams(temperature=0.2), n=1000), minlength=4)
    assert cold[0] > 900
    f = sampler_ref.filter_logits(logits[0].clone(), SamplingParams(top_p=0.85))
    assert torch.isinf(f[3]) and not torch.isinf(f[2])


MIXED = [SamplingParams(temperature=0.7, top_k=5), SamplingParams(temperature=1.3, top_p=0.6),
         SamplingParams(min_p=0.05), SamplingParams(top_k=20, top_p=0.9, min_p=0.01), SamplingParams(),
         SamplingParams(top_k=1000000)]


def test_batched_filters_match_the_per_row_rules():
    torch.manual_seed(0)
    logits = torch.randn(len(MIXED), 3000) * 3
    rows = [SampleRow(p, [], []) for p in MIXED]
    got = filter_logits(logits.clone(), rows)
    for i, p in enumerate(MIXED):
        want = sampler_ref.filter_logits(logits[i].clone(), p)
        assert torch.equal(torch.isinf(got[i]), torch.isinf(want)), p
        assert torch.equal(got[i][~torch.isinf(got[i])], want[~torch.isinf(want)])


def test_batched_penalties_match_the_per_row_rules_as_tokens_arrive():
    torch.manual_seed(1)
    params = [SamplingParams(repetition_penalty=1.3), SamplingParams(presence_penalty=0.5, frequency_penalty=0.8),
              SamplingParams(repetition_penalty=0.7, frequency_penalty=-0.4)]
    prompts = [[3, 5, 5, 99], [7], [1, 2, 3]]
    outputs = [[], [], []]
    states = [RequestSampler() for _ in params]
    for step in range(4):  # the state is built once, then folds in each new token
        logits = torch.randn(3, 128)
        rows = [SampleRow(p, pr, out, st) for p, pr, out, st in zip(params, prompts, outputs, states)]
        got = apply_penalties(logits.clone(), rows)
        for i, p in enumerate(params):
            want = sampler_ref.apply_penalties(logits[i].clone(), p, prompts[i], outputs[i])
            assert torch.allclose(got[i], want, atol=1e-6), (step, i)
        for i, out in enumerate(outputs):
            out.append([5, 9, 9, 100][step] + i)


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    rep = sampler_ref.apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0], [1])
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]
    pres = sampler_ref.apply_penalties(logits.clone(), SamplingParams(presence_penalty=1.0, frequency_penalty=0.5),
                                       [], [2, 2, 3])
    assert torch.allclose(pres, torch.tensor([2.0, -1.0, 0.5 - 1.0 - 1.0, 0.0 - 1.0 - 0.5]))
    # greedy with a penalty: the penalised favourite loses
    out = sample(torch.tensor([[2.0, 1.5, 0.0]]), [SampleRow(SamplingParams(temperature=0, repetition_penalty=2.0),
                                                             [0], [])])
    assert out[0].token_id == 1


def test_same_seed_same_tokens_whatever_the_batch():
    logits = torch.randn(1, 1000)
    a = draw(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    b = draw(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    c = draw(logits, SamplingParams(temperature=1.0), n=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)

    def seeded_run(batch_with: int) -> list[int]:
        g = torch.Generator().manual_seed(11)
        state = RequestSampler(g)
        toks = []
        for _ in range(20):
            rows = [SampleRow(SamplingParams(temperature=1.0, seed=11), [], [], state)]
            rows += [SampleRow(SamplingParams(temperature=1.0), [], []) for _ in range(batch_with)]
            toks.append(sample(logits.expand(len(rows), -1).clone(), rows)[0].token_id)
        return toks

    assert seeded_run(0) == seeded_run(7)


def test_greedy_and_logprobs_in_a_mixed_batch():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0], [0.0, 0.0, 9.0]])
    out = sample(logits.clone(), [SampleRow(SamplingParams(temperature=0), [], [])] * 3)
    assert [s.token_id for s in out] == [1, 0, 2]
    rows = [SampleRow(SamplingParams(temperature=0, logprobs=2), [], []), SampleRow(SamplingParams(temperature=0), [], []),
            SampleRow(SamplingParams(temperature=1.0, logprobs=0, seed=1), [], [], RequestSampler(torch.Generator()))]
    out = sample(logits.clone(), rows)
    lp = torch.log_softmax(logits, -1)
    assert abs(out[0].logprob - float(lp[0, 1])) < 1e-6 and [t for t, _ in out[0].top_logprobs] == [1, 2]
    assert out[1].logprob is None and out[1].token_id == 0
    assert abs(out[2].logprob - float(lp[2, out[2].token_id])) < 1e-6 and out[2].top_logprobs == []


@pytest.mark.parametrize("n", [1, 32])
def test_sample_does_no_per_token_python_work_over_the_context(n):
    # penalty state is built from the prompt once; later steps fold only the new token
    prompt = list(range(5000))
    state = RequestSampler()
    p = SamplingParams(repetition_penalty=1.2, frequency_penalty=0.1, temperature=0)
    out = []
    for _ in range(3):
        rows = [SampleRow(p, prompt, out, state)] + [SampleRow(SamplingParams(), [], []) for _ in range(n - 1)]
        out.append(sample(torch.randn(n, 6000), rows)[0].token_id)
        assert state.num_folded == len(out) - 1
    assert bool(state.seen[:5000].all()) and int(state.counts.sum()) == len(out) - 1
