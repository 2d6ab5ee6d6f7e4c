"""Tensor-parallel head layout (``csps.core.tp_shard``): even splits, replicated KV heads, the KV-head map,
and the KV-cache bytes every layer derives from it."""

import pytest

from csps.core.tp_shard import TPShard, max_kv_heads_per_rank, split_range
from csps.presets import preset_config


@pytest.mark.parametrize(
    "hq, hkv, tp, expected",
    [
        (32, 8, 4, [(0, 8, 0, 2), (8, 16, 2, 4), (16, 24, 4, 6), (24, 32, 6, 8)]),  # no replication
        (8, 2, 4, [(0, 2, 0, 1), (2, 4, 0, 1), (4, 6, 1, 2), (6, 8, 1, 2)]),  # kv heads < tp: replicated
        (9, 3, 2, [(0, 5, 0, 2), (5, 9, 1, 3)]),  # SmolLM2: kv head 1 on both ranks
    ],
)
def test_head_shards(hq, hkv, tp, expected):
    shards = [TPShard(r, tp) for r in range(tp)]
    assert [(*s.head_range(hq), *s.kv_head_range(hq, hkv)) for s in shards] == expected
    for s in shards:  # every local q head finds its kv head locally
        q0, q1 = s.head_range(hq)
        k0, _ = s.kv_head_range(hq, hkv)
        assert [k + k0 for k in s.kv_head_of_q_head(hq, hkv)] == [h // (hq // hkv) for h in range(q0, q1)]
    # a map where the local heads do not keep the model's grouping (the kernels then expand K/V)
    assert [s.kv_head_map(hq, hkv) is not None for s in shards] == [(e[1] - e[0]) != (e[3] - e[2]) * (hq // hkv)
                                                                   for e in expected]
    assert max_kv_heads_per_rank(hq, hkv, tp) == max(e[3] - e[2] for e in expected)


def test_split_range_covers_evenly():
    pieces = [split_range(10, 4, i) for i in range(4)]
    assert pieces == [(0, 3), (3, 6), (6, 8), (8, 10)]


def test_kv_bytes_per_token_follow_the_tp_layout():
    m = preset_config("smollm2-135m")  # 30 layers, 9 q / 3 kv heads of 64
    assert m.kv_bytes_per_token(4) == 2 * 30 * 3 * 64 * 4
    assert m.kv_bytes_per_token(2, tp=2) == 2 * 30 * 2 * 64 * 2  # 2 of the 3 KV heads on each TP rank
