"""Ulysses (DeepSpeed all-to-all) attention vs the fp32 reference (1e-5), and its byte count."""

import importlib.util

import pytest
import torch
from _dist import SPAWN_TIMEOUT_S, TOL, max_err, rand_qkv, world_comm
from csps.kernels import attention_ref
from csps.parallel import (
    contiguous_shards,
    shard_indices,
    spawn,
    ulysses_attention,
    zigzag_shards,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (extra: ulysses)"
)
D, E = 8, 4


def _ulysses(rank, world_size, n, hq, hkv):
    comm = world_comm(world_size)
    q, k, v = rand_qkv(21, n, n, hq, hkv, D)
    pos = torch.arange(n)
    ref_o, ref_l = attention_ref(q, k, v, pos, pos)
    out = []
    for shards in (zigzag_shards(n, world_size), contiguous_shards(n, world_size)):
        idx = [shard_indices(s) for s in shards]
        mine = idx[rank]
        comm.reset_step()
        o, l = ulysses_attention(q[mine], k[mine], v[mine], [pos[i] for i in idx], comm)
        out.append(dict(
            out=max_err(o, ref_o[mine]), lse=max_err(l, ref_l[mine]), dtype_ok=o.dtype == q.dtype,
            bytes=comm.bytes_step.get("ulysses_a2a", 0), t_max=max(len(i) for i in idx),
        ))
    return out


@pytest.mark.parametrize(
    "world_size, n, hq, hkv",
    [
        (2, 64, 4, 2),  # heads divisible by P
        (2, 61, 9, 3),  # SmolLM2's 9 q / 3 kv heads on 2 ranks: uneven, needs the mpu; padding
        (4, 50, 8, 4),  # P = 4, n not divisible by 2P
    ],
)
def test_ulysses_matches_reference(world_size, n, hq, hkv):
    results = spawn(_ulysses, world_size, args=(n, hq, hkv), timeout_s=SPAWN_TIMEOUT_S)
    p = world_size
    for r, per_rank in enumerate(results):
        for case in per_rank:
            assert case["out"] <= TOL and case["lse"] <= TOL and case["dtype_ok"], case
            t = case["t_max"]
            if hkv % p == 0:  # even split: q, k, v minus the own head slice, + fp32 [out | lse]
                q_heads, kv_heads = hq // p, hkv // p
            else:  # DeepSpeed splits by kv groups: [6, 3] q heads, [2, 1] kv heads
                q_heads, kv_heads = [6, 3][r], [2, 1][r]
            qkv_bytes = t * D * E * ((hq - q_heads) + 2 * (hkv - kv_heads))
            out_bytes = (p - 1) * t * q_heads * (D + 1) * 4
            expected = qkv_bytes + out_bytes
            assert case["bytes"] == expected, (r, case)
