"""Sequence-parallel and tensor-parallel layouts reproduce the single-process engine.

Every layout in {SP 2, SP 4, TP 2, SP 2 x TP 2} runs real gloo ranks and must give identical
greedy tokens and logits within 1e-3 (fp32) for: a prompt spanning several chunks mixed with short
requests, a prefix-cache hit, and a preemption.
"""

import pytest
import torch
from greedy import first_real_divergence
from hf_oracle import build_hf
from sp_harness import max_logit_diff, run

LAYOUTS = [(2, 1), (4, 1), (1, 2), (2, 2)]
TOL = 1e-3


def ids(n, seed):
    return torch.randint(3, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.fixture(scope="module")
def weights():
    # 8 query heads / 2 KV heads: TP 2 shards heads evenly, SP 4 splits every chunk four ways
    _, cfg, sd = build_hf("llama", num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2,
                          hidden_size=128, intermediate_size=256)
    return cfg, sd


LONG, SHARED = ids(700, 1), ids(400, 2)
WORKLOAD = [
    [("long", LONG), ("short1", ids(30, 3)), ("short2", ids(90, 4)), ("short3", ids(5, 5))],
    [("prefix_a", SHARED + ids(20, 6))],
    [("prefix_b", SHARED + ids(33, 7)), ("short4", ids(50, 8))],
]
KW = dict(token_budget=64, num_blocks=256, max_model_len=2048, sp_threshold_tokens=200)


@pytest.fixture(scope="module")
def reference(weights):
    return run(weights, WORKLOAD, **KW)


@pytest.mark.parametrize("sp,tp", LAYOUTS)
def test_layout_reproduces_single_process(weights, reference, sp, tp):
    got = run(weights, WORKLOAD, sp=sp, tp=tp, **KW)
    assert got.tokens == reference.tokens
    diff = max_logit_diff(got, reference)
    assert diff <= TOL, f"sp={sp} tp={tp}: max |logit diff| {diff:.2e}"
    assert got.cached["prefix_b"] > 0 and reference.cached["prefix_b"] > 0
    if sp > 1:
        assert got.bytes_by_kind.get("pass_kv", 0) + got.bytes_by_kind.get("pass_q", 0) > 0
    if tp > 1:
        assert got.bytes_by_kind.get("tp_allreduce", 0) > 0


@pytest.mark.parametrize("exchange", ["pass_kv", "pass_q"])
def test_forced_exchanges_agree(weights, reference, exchange):
    got = run(weights, WORKLOAD, sp=2, sp_exchange=exchange, **KW)
    assert got.tokens == reference.tokens
    assert max_logit_diff(got, reference) <= TOL
    assert got.bytes_by_kind.get(exchange, 0) > 0


PREEMPT = [[(f"p{i}", ids(150 + 40 * i, 10 + i)) for i in range(4)]]
PREEMPT_KW = dict(token_budget=64, max_model_len=2048, sp_threshold_tokens=200, enable_prefix_caching=False)


@pytest.mark.parametrize("sp,tp", [(2, 1), (2, 2)])
def test_preemption_under_sp_gives_same_tokens(weights, sp, tp):
    ref = run(weights, PREEMPT, num_blocks=400, **PREEMPT_KW)
    got = run(weights, PREEMPT, sp=sp, tp=tp, num_blocks=15, **PREEMPT_KW)
    assert got.preemptions > 0, "the small pools must force preemption"
    assert got.tokens == ref.tokens
    assert max_logit_diff(got, ref) <= TOL


def test_ulysses_agrees(weights, reference):
    got = run(weights, WORKLOAD, sp=2, sp_attn="ulysses", **KW)
    assert got.tokens == reference.tokens
    assert max_logit_diff(got, reference) <= TOL
    assert got.bytes_by_kind.get("ulysses_a2a", 0) > 0


@pytest.mark.parametrize("sp,tp", [(2, 1), (2, 2)])
def test_long_sp_decode_matches_single_process(weights, sp, tp):
    # 2,600 prompt tokens: each SP rank holds over 1,024 of them, more than one 512-key partition of the
    # paged decode kernel, so its pass-Q decodes split and merge partitions over the rank's own blocks
    from csps.core import kv_placement as kp
    from csps.kernels.decode import PARTITION_TOKENS

    assert min(kp.shares(0, 2600, 2, 16)) > 2 * PARTITION_TOKENS
    kw = dict(token_budget=512, num_blocks=512, max_model_len=4096, sp_threshold_tokens=200, enable_prefix_caching=False)
    workload = [[("long", ids(2600, 9))]]
    ref = run(weights, workload, **kw)
    got = run(weights, workload, sp=sp, tp=tp, **kw)
    assert got.tokens == ref.tokens
    assert max_logit_diff(got, ref) <= TOL
    assert got.bytes_by_kind.get("pass_q", 0) > 0


# bf16 on every machine kind (emulated where the CPU lacks it): the ranks' different reduction orders and
# bf16 rounding move logits by up to a few % of their scale, so tokens may differ only at such near-ties.
BF16_REL_TOL = 0.1


@pytest.mark.parametrize("sp,tp", [(2, 1), (1, 2)])
def test_bf16_layout_close_to_single_process(weights, sp, tp):
    cfg, sd = weights
    bf16 = (cfg, {k: v.bfloat16() for k, v in sd.items()})
    ref = run(bf16, WORKLOAD[:1], dtype="bfloat16", **KW)
    got = run(bf16, WORKLOAD[:1], sp=sp, tp=tp, dtype="bfloat16", **KW)
    for rid, want in ref.tokens.items():
        scale = ref.logits[rid][0].abs().max().item()
        rel = (got.logits[rid][0] - ref.logits[rid][0]).abs().max().item() / scale  # after the same prompt
        assert rel <= BF16_REL_TOL, f"{rid}: {rel:.2e}"
        assert first_real_divergence(want, ref.logits[rid], got.tokens[rid], near_tie=BF16_REL_TOL * scale) is None
