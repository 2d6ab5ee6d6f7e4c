"""Pass-KV ring attention vs the fp32 reference on the full unsharded sequence (tolerance 1e-5)."""

import pytest
import torch
from _dist import SPAWN_TIMEOUT_S, TOL, max_err, rand_qkv, random_split, world_comm
from csps.kernels import attention_ref, merge_attn, merge_many
from csps.parallel import (
    contiguous_shards,
    ring_attention,
    shard_indices,
    shard_sizes,
    spawn,
    zigzag_shards,
)

HEADS = [(6, 2), (4, 4)]  # (Hq, Hkv): GQA and MHA
D = 8


def test_merge_of_rows_without_keys_has_no_nan():
    o = torch.randn(3, 2, 4)
    l = torch.tensor([[0.5, float("-inf")], [float("-inf"), float("-inf")], [1.0, 2.0]])
    empty_o, empty_l = torch.zeros(3, 2, 4), torch.full((3, 2), float("-inf"))
    out, lse = merge_attn(empty_o, empty_l, o * torch.isfinite(l)[..., None], l)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()
    out2, lse2 = merge_many([empty_o, empty_o, o * torch.isfinite(l)[..., None]], [empty_l, empty_l, l])
    assert not torch.isnan(out2).any() and torch.equal(lse2, lse)


def _kv_bytes(k_pos_per_rank, rank, hkv, d, elem_bytes=4):
    """pass_kv bytes rank sends: every block except the next rank's, K and V."""
    p = len(k_pos_per_rank)
    return sum(
        2 * len(k_pos_per_rank[j]) * hkv * d * elem_bytes for j in range(p) if j != (rank + 1) % p
    )


def _whole_prompt(rank, world_size, n):
    comm = world_comm(world_size)
    errs = []
    for seed, (hq, hkv) in enumerate(HEADS):
        q, k, v = rand_qkv(seed, n, n, hq, hkv, D)
        pos = torch.arange(n) + 7  # a chunk that starts at position 7
        ref_o, ref_l = attention_ref(q, k, v, pos, pos)
        for shards in (contiguous_shards(n, world_size), zigzag_shards(n, world_size)):
            idx = [shard_indices(s) for s in shards]
            mine = idx[rank]
            k_pos = [pos[i] for i in idx]
            comm.reset_step()
            o, l = ring_attention(q[mine], pos[mine], k[mine], v[mine], k_pos, comm)
            expected_bytes = _kv_bytes(k_pos, rank, hkv, D) if world_size > 1 else 0
            errs.append(dict(
                out=max_err(o, ref_o[mine]), lse=max_err(l, ref_l[mine]),
                bytes=comm.bytes_step.get("pass_kv", 0), expected_bytes=expected_bytes,
                dtype_ok=o.dtype == q.dtype and l.dtype == torch.float32,
            ))
    return errs


@pytest.mark.parametrize("world_size", [1, 2, 4])
def test_ring_whole_prompt(world_size):
    for per_rank in spawn(_whole_prompt, world_size, args=(50,), timeout_s=SPAWN_TIMEOUT_S):
        for case in per_rank:
            assert case["out"] <= TOL and case["lse"] <= TOL, case
            assert case["bytes"] == case["expected_bytes"], case
            assert case["dtype_ok"]


def _chunk_on_cache(rank, world_size, num_cached, n_new, seed):
    """New chunk (zigzag) on top of cached KV placed at random, non-contiguous, uneven ranks."""
    comm = world_comm(world_size)
    out = []
    for h_seed, (hq, hkv) in enumerate(HEADS):
        total = num_cached + n_new
        q_all, k_all, v_all = rand_qkv(seed + 10 * h_seed, total, total, hq, hkv, D)
        pos_all = torch.arange(total)
        cached_idx = random_split(seed, num_cached, world_size)  # rank -> cached token indices
        new_idx = [num_cached + shard_indices(s) for s in zigzag_shards(n_new, world_size)]
        kv_idx = [torch.cat([c, nw]) for c, nw in zip(cached_idx, new_idx)]  # cache, then new
        new_q = slice(num_cached, total)
        ref_o, ref_l = attention_ref(q_all[new_q], k_all, v_all, pos_all[new_q], pos_all)
        mine_q, mine_kv = new_idx[rank], kv_idx[rank]
        o, l = ring_attention(
            q_all[mine_q], pos_all[mine_q], k_all[mine_kv], v_all[mine_kv],
            [pos_all[i] for i in kv_idx], comm,
        )
        ref_rows = mine_q - num_cached
        out.append(dict(
            out=max_err(o, ref_o[ref_rows]), lse=max_err(l, ref_l[ref_rows]),
            num_q=len(mine_q), num_kv=len(mine_kv),
        ))
    return out


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("num_cached, n_new", [(37, 23), (40, 3), (0, 29), (0, 3)])
def test_ring_chunk_on_cache(world_size, num_cached, n_new):
    results = spawn(_chunk_on_cache, world_size, args=(num_cached, n_new, 3), timeout_s=SPAWN_TIMEOUT_S)
    for per_rank in results:
        for case in per_rank:
            assert case["out"] <= TOL and case["lse"] <= TOL, case
    if 0 in shard_sizes(zigzag_shards(n_new, world_size)):  # covered: a rank without queries
        assert any(case["num_q"] == 0 for per_rank in results for case in per_rank)
        if num_cached == 0:  # ... and without keys
            assert any(case["num_kv"] == 0 for per_rank in results for case in per_rank)


BF16_TOL = 2e-2  # bf16 out rounding (~1 ulp = 7.8e-3 near 1) vs the fp32 reference on the same inputs


def _bf16(rank, world_size, n):
    from csps.parallel import local_attn_from_kv, pass_q_attention

    comm = world_comm(world_size)
    q, k, v = (x.to(torch.bfloat16) for x in rand_qkv(9, n, n, 6, 2, D))
    pos = torch.arange(n)
    ref_o, ref_l = attention_ref(q, k, v, pos, pos)  # computes in fp32
    idx = [shard_indices(s) for s in zigzag_shards(n, world_size)]
    mine = idx[rank]
    o, l = ring_attention(q[mine], pos[mine], k[mine], v[mine], [pos[i] for i in idx], comm)
    o2, l2 = pass_q_attention(
        q[mine], pos[mine], comm, local_attn_from_kv(k[mine], v[mine], pos[mine]), [len(i) for i in idx]
    )
    return dict(
        ring=max_err(o.float(), ref_o.float()[mine]), ring_lse=max_err(l, ref_l[mine]),
        pass_q=max_err(o2.float(), ref_o.float()[mine]), pass_q_lse=max_err(l2, ref_l[mine]),
        dtypes=(o.dtype, l.dtype, o2.dtype, l2.dtype),
        kv_bytes=comm.bytes_total["pass_kv"], k_pos=[len(i) for i in idx],
    )


def test_ring_and_pass_q_bf16():
    for r, res in enumerate(spawn(_bf16, 2, args=(40,), timeout_s=SPAWN_TIMEOUT_S)):
        assert res["dtypes"] == (torch.bfloat16, torch.float32, torch.bfloat16, torch.float32)
        assert max(res["ring"], res["ring_lse"], res["pass_q"], res["pass_q_lse"]) <= BF16_TOL, res
        assert res["kv_bytes"] == 2 * res["k_pos"][r] * 2 * D * 2  # bf16 blocks: 2 bytes each
