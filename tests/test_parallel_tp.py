"""Tensor-parallel helpers: head shards, fused-QKV sharding, row/column-parallel linear over 2 ranks."""

import pytest
import torch

from _dist import SPAWN_TIMEOUT_S, TOL, max_err, rand, world_comm
from csps.kernels import attention_ref
from csps.parallel import spawn
from csps.parallel.tp import (
    column_parallel_linear,
    head_shards,
    row_parallel_linear,
    shard_cols,
    shard_o_proj,
    shard_qkv,
    shard_rows,
)


@pytest.mark.parametrize(
    "hq, hkv, tp, expected",
    [
        (32, 8, 4, [(0, 8, 0, 2), (8, 16, 2, 4), (16, 24, 4, 6), (24, 32, 6, 8)]),  # no replication
        (8, 2, 4, [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]),  # kv heads < tp: replicated
        (9, 3, 2, [(0, 5, 0, 2), (5, 9, 1, 3)]),  # SmolLM2: kv head 1 on both ranks
    ],
)
def test_head_shards(hq, hkv, tp, expected):
    shards = head_shards(hq, hkv, tp)
    assert [(s.q_start, s.q_end, s.kv_start, s.kv_end) for s in shards] == expected
    for s in shards:  # every local q head finds its kv head locally
        global_kv = torch.arange(s.q_start, s.q_end) // (hq // hkv)
        assert torch.equal(s.kv_index_per_q() + s.kv_start, global_kv)
    assert all(s.uniform_gqa for s in shards) == ((hq, hkv) != (9, 3))


def _tp_layers(rank, world_size):
    comm = world_comm(world_size)
    t, d_in, d_out = 5, 12, 7
    x, w, b = rand(1, t, d_in), rand(2, d_out, d_in), rand(3, d_out)
    full = torch.nn.functional.linear(x, w, b)
    # row-parallel: input columns split, partial sums all-reduced, bias once
    y_row = row_parallel_linear(shard_cols(x, rank, world_size), shard_cols(w, rank, world_size), comm, b)
    row_bytes = comm.bytes_total["tp_allreduce"]
    # column-parallel: output rows split, no communication
    y_col = column_parallel_linear(x, shard_rows(w, rank, world_size), shard_rows(b, rank, world_size))
    full_col = shard_cols(full, rank, world_size)  # this rank's slice of the output features

    # A whole attention block with SmolLM2's head layout (9 q / 3 kv heads) on tp ranks.
    hq, hkv, hd, hidden, n = 9, 3, 4, 16, 6
    w_qkv, w_o = rand(4, (hq + 2 * hkv) * hd, hidden), rand(5, hidden, hq * hd)
    h = rand(6, n, hidden)
    pos = torch.arange(n)

    def attn_block(qkv_rows, nq, nkv, kv_idx):
        qkv = h @ qkv_rows.T
        q = qkv[:, : nq * hd].view(n, nq, hd)
        k = qkv[:, nq * hd : (nq + nkv) * hd].view(n, nkv, hd)[:, kv_idx]  # expand to nq heads
        v = qkv[:, (nq + nkv) * hd :].view(n, nkv, hd)[:, kv_idx]
        return attention_ref(q, k, v, pos, pos)[0].reshape(n, nq * hd)

    full_attn = attn_block(w_qkv, hq, hkv, torch.arange(hq) // (hq // hkv)) @ w_o.T
    sh = head_shards(hq, hkv, world_size)[rank]
    local = attn_block(shard_qkv(w_qkv, hq, hkv, hd, rank, world_size), sh.num_q_heads, sh.num_kv_heads,
                       sh.kv_index_per_q())
    tp_attn = row_parallel_linear(local, shard_o_proj(w_o, hq, hd, rank, world_size), comm)
    return dict(
        row=max_err(y_row, full), col=max_err(y_col, full_col), attn=max_err(tp_attn, full_attn),
        row_bytes=row_bytes, total_bytes=comm.bytes_total["tp_allreduce"],
    )


def test_tp_linear_and_attention_block_match_unsharded():
    p = 2
    for res in spawn(_tp_layers, p, timeout_s=SPAWN_TIMEOUT_S):
        assert res["row"] <= TOL and res["col"] <= TOL and res["attn"] <= TOL, res
        assert res["row_bytes"] == 2 * (p - 1) * 5 * 7 * 4 // p  # ring all-reduce of [5, 7] fp32
        assert res["total_bytes"] == res["row_bytes"] + 2 * (p - 1) * 6 * 16 * 4 // p
