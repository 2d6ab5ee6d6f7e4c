"""Pass-Q attention vs the fp32 reference (tolerance 1e-5), and its byte counts vs the formulas."""

import pytest
import torch
from _dist import SPAWN_TIMEOUT_S, TOL, max_err, rand_qkv, random_split, world_comm
from csps.kernels import attention_ref, decode_attention
from csps.parallel import (
    local_attn_from_kv,
    pass_q_attention,
    ring_attention,
    shard_indices,
    spawn,
    zigzag_shards,
)

HQ, HKV, D, E = 6, 2, 8, 4  # heads, head dim, fp32 element bytes


def _prefill_chunk(rank, world_size, num_cached, n_new, positions_known):
    """A zigzag-sharded chunk on top of randomly placed cached KV; pass-Q, then pass-KV."""
    comm = world_comm(world_size)
    total = num_cached + n_new
    q_all, k_all, v_all = rand_qkv(5, total, total, HQ, HKV, D)
    pos_all = torch.arange(total)
    cached_idx = random_split(11, num_cached, world_size)
    new_idx = [num_cached + shard_indices(s) for s in zigzag_shards(n_new, world_size)]
    kv_idx = [torch.cat([c, nw]) for c, nw in zip(cached_idx, new_idx)]
    ref_o, ref_l = attention_ref(q_all[num_cached:], k_all, v_all, pos_all[num_cached:], pos_all)
    mine_q, mine_kv = new_idx[rank], kv_idx[rank]
    local_attn = local_attn_from_kv(k_all[mine_kv], v_all[mine_kv], pos_all[mine_kv])
    o, l = pass_q_attention(
        q_all[mine_q], pos_all[mine_q], comm, local_attn, [len(i) for i in new_idx],
        q_pos_per_rank=[pos_all[i] for i in new_idx] if positions_known else None,
    )
    ring_attention(
        q_all[mine_q], pos_all[mine_q], k_all[mine_kv], v_all[mine_kv], [pos_all[i] for i in kv_idx], comm
    )
    rows = mine_q - num_cached
    return dict(
        out=max_err(o, ref_o[rows]), lse=max_err(l, ref_l[rows]), num_q=[len(i) for i in new_idx],
        bytes=dict(comm.bytes_total),
    )


@pytest.mark.parametrize("world_size", [2, 4])
@pytest.mark.parametrize("num_cached, n_new", [(37, 23), (40, 3)])
@pytest.mark.parametrize("positions_known", [False, True])
def test_pass_q_prefill_chunk(world_size, num_cached, n_new, positions_known):
    results = spawn(
        _prefill_chunk, world_size, args=(num_cached, n_new, positions_known), timeout_s=SPAWN_TIMEOUT_S
    )
    p = world_size
    for r, res in enumerate(results):
        assert res["out"] <= TOL and res["lse"] <= TOL, res
        n = res["num_q"]
        assert res["bytes"]["pass_q"] == (p - 1) * n[r] * HQ * D * E
        assert res["bytes"].get("pass_q_pos", 0) == (0 if positions_known else (p - 1) * n[r] * 8)
        assert res["bytes"]["pass_q_out"] == sum(n[j] for j in range(p) if j != r) * HQ * (D * E + 4)
    # background.md §15: pass-KV / pass-Q bytes = 2·g·(T+P)/T with g = n_kv / n_q.
    kv_total = sum(res["bytes"]["pass_kv"] for res in results)
    q_total = sum(res["bytes"]["pass_q"] for res in results)
    assert kv_total * n_new * HQ == q_total * 2 * HKV * (n_new + num_cached)


def _decode(rank, world_size, contexts, owners):
    """One decode query per sequence (owner rank holds it); each sequence's KV spread at random.

    local_attn is a closure over this rank's per-sequence KV that uses the batched decode kernel,
    as a paged cache would: it maps each incoming query to its sequence from the plan (sequences
    ordered by owner rank, then by index), which every rank knows.
    """
    comm = world_comm(world_size)
    seqs = []
    for s, ctx_len in enumerate(contexts):
        q, k, v = rand_qkv(100 + s, 1, ctx_len, HQ, HKV, D)
        local = random_split(200 + s, ctx_len, world_size)[rank]
        seqs.append(dict(q=q, k=k, v=v, local=local, ctx_len=ctx_len))
    order = [s for j in range(world_size) for s in range(len(contexts)) if owners[s] == j]
    mine = [s for s in order if owners[s] == rank]

    def local_attn(q, q_pos):
        # q: [B, Hq, D] (one query per sequence in `order`), q_pos: [B] (unused: decode sees all)
        kv_lens = torch.tensor([len(seqs[s]["local"]) for s in order])
        k_pad = torch.zeros(len(order), max([1, *kv_lens.tolist()]), HKV, D)
        v_pad = torch.zeros_like(k_pad)
        for b, s in enumerate(order):
            k_pad[b, : kv_lens[b]] = seqs[s]["k"][seqs[s]["local"]]
            v_pad[b, : kv_lens[b]] = seqs[s]["v"][seqs[s]["local"]]
        return decode_attention(q, k_pad, v_pad, kv_lens)

    q_mine = torch.cat([seqs[s]["q"] for s in mine]) if mine else torch.zeros(0, HQ, D)
    q_pos_per_rank = [torch.tensor([contexts[s] for s in order if owners[s] == j], dtype=torch.int64)
                      for j in range(world_size)]
    num_q = [len(p) for p in q_pos_per_rank]
    o, l = pass_q_attention(q_mine, q_pos_per_rank[rank], comm, local_attn, num_q, q_pos_per_rank)
    errs = []
    for row, s in enumerate(mine):
        sq = seqs[s]
        ref_o, ref_l = attention_ref(
            sq["q"], sq["k"], sq["v"], torch.tensor([sq["ctx_len"]]), torch.arange(sq["ctx_len"])
        )
        errs.append(max(max_err(o[row : row + 1], ref_o), max_err(l[row : row + 1], ref_l)))
    return dict(err=max(errs, default=0.0), num_q=num_q, bytes=dict(comm.bytes_total))


@pytest.mark.parametrize(
    "world_size, contexts, owners",
    [
        (2, [300], [0]),  # one owner
        (4, [300], [2]),  # one owner, three ranks without queries
        (4, [50, 300, 3, 120], [1, 3, 1, 0]),  # several owners; rank 2 owns none; tiny context
    ],
)
def test_pass_q_decode(world_size, contexts, owners):
    results = spawn(_decode, world_size, args=(contexts, owners), timeout_s=SPAWN_TIMEOUT_S)
    p = world_size
    for r, res in enumerate(results):
        assert res["err"] <= TOL, res
        n = res["num_q"]
        assert res["bytes"].get("pass_q", 0) == (p - 1) * n[r] * HQ * D * E
        assert "pass_q_pos" not in res["bytes"]  # positions were known: none sent
        assert res["bytes"]["pass_q_out"] == sum(n[j] for j in range(p) if j != r) * HQ * (D * E + 4)


def _decode_bytes_by_context(rank, world_size, contexts):
    comm = world_comm(world_size)
    out = {}
    for ctx_len in contexts:
        q, k, v = rand_qkv(7, 1, ctx_len, 4, 2, 4)
        local = random_split(8, ctx_len, world_size)[rank]
        k_pos = torch.arange(ctx_len)
        q_pos = torch.tensor([ctx_len])
        num_q = [1] + [0] * (world_size - 1)  # rank 0 owns the sequence
        mine_q = q if rank == 0 else q[:0]
        comm.reset_step()
        o, l = pass_q_attention(
            mine_q, q_pos[: num_q[rank]], comm, local_attn_from_kv(k[local], v[local], k_pos[local]), num_q
        )
        q_bytes = sum(comm.bytes_step.values())
        err = 0.0
        if rank == 0:
            ref_o, ref_l = attention_ref(q, k, v, q_pos, k_pos)
            err = max(max_err(o, ref_o), max_err(l, ref_l))
        comm.reset_step()  # contrast: pass-KV for the same decode step
        all_local = random_split(8, ctx_len, world_size)
        ring_attention(mine_q, q_pos[: num_q[rank]], k[local], v[local], [k_pos[i] for i in all_local], comm)
        out[ctx_len] = dict(q_bytes=q_bytes, kv_bytes=comm.bytes_step["pass_kv"], err=err)
    return out


def test_pass_q_decode_bytes_independent_of_context():
    contexts = [1024, 4096, 16384]
    results = spawn(_decode_bytes_by_context, 2, args=(contexts,), timeout_s=SPAWN_TIMEOUT_S)
    hq, d = 4, 4
    for r, per_ctx in enumerate(results):
        q_bytes = {c: per_ctx[c]["q_bytes"] for c in contexts}
        # owner: q + positions out; the other rank: one partial (out + lse) back.
        expected = (hq * d * E + 8) if r == 0 else hq * (d * E + 4)
        assert set(q_bytes.values()) == {expected}, q_bytes
        assert all(per_ctx[c]["err"] <= TOL for c in contexts)
        kv = [per_ctx[c]["kv_bytes"] for c in contexts]
        assert kv[0] < kv[1] < kv[2] and kv[2] > 1000 * expected  # pass-KV grows with context
