"""Kernels against their plain fp32 twins and against transformers' RoPE."""

import pytest
import torch
from csps.kernels import (
    RopeScaling,
    apply_rope,
    attention,
    attention_ref,
    decode_attention,
    merge_attn,
    merge_many,
    rms_norm,
    rms_norm_ref,
    rope_inv_freq,
)
from csps.kernels.paged import gather_kv, gather_kv_padded, write_kv

G = torch.Generator().manual_seed(0)


def rand(*shape):
    return torch.randn(*shape, generator=G)


@pytest.mark.parametrize("tq,tk,start,window", [
    (16, 16, 0, None),  # whole prompt
    (7, 40, 33, None),  # chunk on top of cached KV
    (1, 50, 49, None),  # one token
    (20, 60, 40, 8),  # sliding window
    (64, 64, 0, 16),
])
def test_attention_matches_reference(tq, tk, start, window):
    q, k, v = rand(tq, 6, 16), rand(tk, 2, 16), rand(tk, 2, 16)
    qp, kp = torch.arange(start, start + tq), torch.arange(tk)
    o, l = attention(q, k, v, qp, kp, sliding_window=window)
    ro, rl = attention_ref(q, k, v, qp, kp, sliding_window=window)
    assert (o - ro).abs().max() <= 1e-5 and (l - rl).abs().max() <= 1e-5
    assert l.dtype == torch.float32


def test_attention_with_scattered_positions_and_empty_rows():
    perm = torch.randperm(80, generator=G)
    qp, kp = perm[:20], perm[20:]
    q, k, v = rand(20, 4, 8), rand(60, 4, 8), rand(60, 4, 8)
    o, l = attention(q, k, v, qp, kp)
    ro, rl = attention_ref(q, k, v, qp, kp)
    empty = torch.isinf(rl)
    assert torch.equal(torch.isinf(l), empty)
    assert (o - ro).abs().max() <= 1e-5 and (l[~empty] - rl[~empty]).abs().max() <= 1e-5
    assert not torch.isnan(o).any()


@pytest.mark.parametrize("rank", [0, 1])
def test_attention_over_zigzag_runs_matches_reference(rank):
    # a rank's zigzag share of a 64-token chunk on top of 40 cached tokens (P = 2: pieces of 16), over
    # keys of its own share, the other rank's share and the cache (runs: all visible, causal, invisible,
    # partly visible)
    piece = lambda i: torch.arange(40 + 16 * i, 56 + 16 * i)  # noqa: E731
    qp = torch.cat([piece(rank), piece(3 - rank)])
    for kp in (qp, torch.cat([piece(1 - rank), piece(2 + rank)]), torch.cat([torch.arange(40), qp]),
               torch.cat([torch.arange(30, 50), piece(3 - rank)])):
        q, k, v = rand(32, 6, 16), rand(kp.shape[0], 2, 16), rand(kp.shape[0], 2, 16)
        o, l = attention(q, k, v, qp, kp)
        ro, rl = attention_ref(q, k, v, qp, kp)
        empty = torch.isinf(rl)
        assert torch.equal(torch.isinf(l), empty)
        assert (o - ro).abs().max() <= 1e-5 and (l[~empty] - rl[~empty]).abs().max() <= 1e-5


@pytest.mark.parametrize("rank,q_tile,dtype", [(0, 8, torch.float32), (1, 8, torch.float32), (1, 0, torch.float32),
                                               (0, 1000, torch.float32), (1, 8, torch.bfloat16)])
def test_attention_over_granular_zigzag_matches_reference(rank, q_tile, dtype):
    # the engine's placement: pieces of one KV block (granule 4 here), a 64-token chunk on top of 37
    # cached tokens at P = 2, so a rank's share has many runs; over its own share, the other rank's
    # share and its cached KV plus its share; tiles of 8 queries, none (dense mask), or one tile
    import importlib

    from csps.core import kv_placement as kp
    from csps.core.plan import ranges_to_list

    attention_mod = importlib.import_module("csps.kernels.attention_torch")  # the package exports the function

    share = lambda r, a, b: torch.tensor(ranges_to_list(kp.ranges_per_rank(a, b, 2, 4)[r]))  # noqa: E731
    qp = share(rank, 37, 101)
    assert len(attention_mod._runs(qp)) ** 2 > attention_mod.MAX_RUN_PAIRS  # not the few-runs path
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for kpos in (qp, share(1 - rank, 37, 101), share(rank, 0, 101)):
        q, k, v = (rand(n, h, 16).to(dtype) for n, h in ((qp.shape[0], 6), (kpos.shape[0], 2), (kpos.shape[0], 2)))
        o, l = attention_mod.attention_torch(q, k, v, qp, kpos, q_tile=q_tile)
        ro, rl = attention_ref(q, k, v, qp, kpos)
        empty = torch.isinf(rl)
        assert o.dtype == dtype and l.dtype == torch.float32
        assert torch.equal(torch.isinf(l), empty)
        assert (o.float() - ro.float()).abs().max() <= tol and (l[~empty] - rl[~empty]).abs().max() <= tol


def test_attention_bf16_close_to_reference():
    q, k, v = rand(32, 6, 64).bfloat16(), rand(96, 2, 64).bfloat16(), rand(96, 2, 64).bfloat16()
    qp, kp = torch.arange(64, 96), torch.arange(96)
    o, l = attention(q, k, v, qp, kp)
    ro, rl = attention_ref(q, k, v, qp, kp)
    assert o.dtype == torch.bfloat16 and l.dtype == torch.float32
    assert (o.float() - ro.float()).abs().max() <= 3e-2


def test_decode_attention_matches_reference():
    # three batched sequences, a single one (the einsum path), and a sequence with no keys yet
    for lens in ([40, 17, 1], [23], [0, 40]):
        b, L = len(lens), 40
        q, k, v = rand(b, 6, 16), rand(b, L, 2, 16), rand(b, L, 2, 16)
        for window in (None, 8):
            o, l = decode_attention(q, k, v, torch.tensor(lens), sliding_window=window)
            for i, n in enumerate(lens):
                if n == 0:
                    assert (o[i] == 0).all() and torch.isneginf(l[i]).all()
                    continue
                # the query is the newest token: its own key is the last cached one
                ro, rl = attention_ref(q[i : i + 1], k[i, :n], v[i, :n], torch.tensor([n - 1]), torch.arange(n),
                                       sliding_window=window)
                assert (o[i] - ro[0]).abs().max() <= 1e-5 and (l[i] - rl[0]).abs().max() <= 1e-5


def test_merge_of_halves_equals_full_attention_and_is_inf_safe():
    q, k, v = rand(10, 4, 8), rand(30, 2, 8), rand(30, 2, 8)
    qp, kp = torch.full((10,), 100), torch.arange(30)
    o1, l1 = attention_ref(q, k[:12], v[:12], qp, kp[:12])
    o2, l2 = attention_ref(q, k[12:], v[12:], qp, kp[12:])
    ro, rl = attention_ref(q, k, v, qp, kp)
    o, l = merge_attn(o1, l1, o2, l2)
    assert (o - ro).abs().max() <= 1e-5 and (l - rl).abs().max() <= 1e-5
    om, lm = merge_many([o1, o2], [l1, l2])
    assert (om - ro).abs().max() <= 1e-5
    # rows that saw no key yet: -inf on both sides -> stays -inf, out 0, never NaN
    ninf = torch.full_like(l1, float("-inf"))
    o, l = merge_attn(torch.zeros_like(o1), ninf, torch.zeros_like(o2), ninf)
    assert torch.isinf(l).all() and (o == 0).all()
    o, l = merge_attn(torch.zeros_like(o1), ninf, o2, l2)
    assert (o - o2).abs().max() <= 1e-6 and torch.equal(l, l2)
    om, lm = merge_many([torch.zeros_like(o1)] * 3, [ninf] * 3)
    assert not torch.isnan(om).any() and torch.isinf(lm).all()


def test_rms_norm_matches_twin():
    x, w = rand(7, 64), rand(64)
    assert (rms_norm(x, w, 1e-5) - rms_norm_ref(x, w, 1e-5)).abs().max() <= 1e-5


@pytest.mark.parametrize("rope", [
    None,
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8192},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 16,
     "mscale": 1.0, "mscale_all_dim": 0.5},
])
def test_rope_inv_freq_matches_transformers(rope):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=512, num_attention_heads=4, rope_theta=500000.0,
                                   max_position_embeddings=32768, rope_scaling=rope)
    ours, factor = rope_inv_freq(128, 500000.0, RopeScaling.from_hf(rope))
    if rope is None:
        want = 1.0 / (500000.0 ** (torch.arange(0, 128, 2).float() / 128))
        want_factor = 1.0
    else:
        want, want_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg, "cpu")
    assert torch.allclose(ours, want.float(), rtol=1e-6, atol=0)
    assert abs(factor - want_factor) < 1e-9


def test_rope_rotation_preserves_norm_and_relative_positions():
    inv, f = rope_inv_freq(16, 10000.0, RopeScaling())
    from csps.kernels import rope_cos_sin

    q, k = rand(1, 1, 16), rand(1, 1, 16)
    def score(pq, pk):
        cq, sq = rope_cos_sin(torch.tensor([pq]), inv, f, torch.float32)
        ck, sk = rope_cos_sin(torch.tensor([pk]), inv, f, torch.float32)
        return (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum()
    assert abs(score(10, 3) - score(107, 100)) < 1e-4


def test_paged_write_and_gather_roundtrip():
    kc, vc = torch.zeros(6, 4, 2, 8), torch.zeros(6, 4, 2, 8)
    k, v = rand(10, 2, 8), rand(10, 2, 8)
    blocks = torch.tensor([3, 1, 5])
    slots = torch.tensor([int(blocks[i // 4]) * 4 + i % 4 for i in range(10)])
    write_kv(kc, vc, k, v, slots)
    gk, gv = gather_kv(kc, vc, blocks, 10)
    assert torch.equal(gk, k) and torch.equal(gv, v)
    pk, _ = gather_kv_padded(kc, vc, torch.tensor([[3, 1, 5], [1, 0, 0]]))
    assert pk.shape == (2, 12, 2, 8) and torch.equal(pk[0, :10], k) and (pk[1, 4:] == 0).all()
