"""The sampler: distributions, filters, penalties, seeds."""

import torch

from csps.core.sampling_params import SamplingParams
from csps.engine.sampler import SampleRow, apply_penalties, filter_logits, sample


def draw(logits, params, n=4000, seed=0):
    g = torch.Generator().manual_seed(seed)
    rows = [SampleRow(params, [], [], g) for _ in range(n)]
    return torch.tensor([s.token_id for s in sample(logits.expand(n, -1).clone(), rows)])


def test_sampling_follows_the_softmax_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    counts = torch.bincount(draw(logits, SamplingParams(temperature=1.0)), minlength=4).float() / 4000
    assert (counts - torch.tensor([0.5, 0.3, 0.15, 0.05])).abs().max() < 0.03


def test_temperature_top_k_top_p_min_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert set(draw(logits, SamplingParams(top_k=2), n=500).tolist()) <= {0, 1}
    assert set(draw(logits, SamplingParams(top_p=0.7), n=500).tolist()) <= {0, 1}
    assert set(draw(logits, SamplingParams(min_p=0.2), n=500).tolist()) <= {0, 1, 2}
    cold = torch.bincount(draw(logits, SamplingParams(temperature=0.2), n=1000), minlength=4)
    assert cold[0] > 900
    f = filter_logits(logits[0].clone(), SamplingParams(top_p=0.85))
    assert torch.isinf(f[3]) and not torch.isinf(f[2])


def test_same_seed_same_tokens():
    logits = torch.randn(1, 1000)
    a = draw(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    b = draw(logits, SamplingParams(temperature=1.0), n=50, seed=3)
    c = draw(logits, SamplingParams(temperature=1.0), n=50, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_penalties():
    logits = torch.tensor([2.0, -1.0, 0.5, 0.0])
    rep = apply_penalties(logits.clone(), SamplingParams(repetition_penalty=2.0), [0], [1])
    assert rep.tolist() == [1.0, -2.0, 0.5, 0.0]
    pres = apply_penalties(logits.clone(), SamplingParams(presence_penalty=1.0, frequency_penalty=0.5), [], [2, 2, 3])
    assert torch.allclose(pres, torch.tensor([2.0, -1.0, 0.5 - 1.0 - 1.0, 0.0 - 1.0 - 0.5]))


def test_greedy_fast_path_and_logprobs():
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 0.0, 0.0]])
    out = sample(logits, [SampleRow(SamplingParams(temperature=0), [], [])] * 2)
    assert [s.token_id for s in out] == [1, 0]
    out = sample(logits, [SampleRow(SamplingParams(temperature=0, logprobs=2), [], [])] * 2)
    lp = torch.log_softmax(logits, -1)
    assert abs(out[0].logprob - float(lp[0, 1])) < 1e-6 and [t for t, _ in out[0].top_logprobs] == [1, 2]
