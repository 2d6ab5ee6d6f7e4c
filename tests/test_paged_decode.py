"""Decode attention over the paged KV cache: the C++ kernel and its plain-torch twin against the fp32
reference attention, and the engine's per-step use of it (LocalAttention over a rank's block tables)."""

import pytest
import torch

from csps.kernels import attention_ref, cpu_ext
from csps.kernels.decode import HeadGroups, paged_decode, paged_decode_torch


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float32)


def test_cpu_kernels_build_on_this_machine():
    # every machine this project runs on has g++ and ninja: the fast path must not silently fall back
    assert cpu_ext.load() is None, f"the C++ CPU kernels did not build: {cpu_ext.load()}"
    assert hasattr(torch.ops.csps, "paged_decode")


def _case(lens, bs=16, hq=6, hkv=2, d=32, dtype=torch.float32, seed=0):
    """A cache with each sequence's blocks scattered in a random order, a table row per sequence
    (rows in shuffled order, unused table entries 0)."""
    g = torch.Generator().manual_seed(seed)
    need = [-(-n // bs) for n in lens]
    num_blocks = 1 + sum(need) + 3
    kc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    vc = torch.randn(num_blocks, bs, hkv, d, generator=g).to(dtype)
    ids = (torch.randperm(num_blocks - 1, generator=g) + 1).tolist()
    width = max(need) + 2
    tables = torch.zeros(len(lens) + 2, width, dtype=torch.int32)
    rows = torch.randperm(len(lens) + 2, generator=g)[: len(lens)]
    per_seq = []
    for i, n in enumerate(need):
        blocks, ids = ids[:n], ids[n:]
        tables[rows[i], :n] = torch.tensor(blocks, dtype=torch.int32)
        per_seq.append(blocks)
    q = torch.randn(len(lens), hq, d, generator=g)
    return q, kc, vc, tables, rows.long(), torch.tensor(lens), per_seq


def _reference(q, kc, vc, per_seq, lens, heads, scale, window=None):
    outs, lses = [], []
    for i, (blocks, n) in enumerate(zip(per_seq, lens.tolist())):
        kk = kc[blocks].flatten(0, 1)[:n].float().index_select(1, heads.kv_of_q)
        vv = vc[blocks].flatten(0, 1)[:n].float().index_select(1, heads.kv_of_q)
        o, lse = attention_ref(q[i : i + 1], kk, vv, torch.tensor([n - 1]), torch.arange(n), scale, window)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses)


@pytest.mark.parametrize("impl", ["kernel", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("head_map", [None, [0, 0, 1, 1, 1]])  # GQA; an uneven TP rank's map
@pytest.mark.parametrize("window", [None, 40])
def test_paged_decode_matches_reference(impl, dtype, head_map, window):
    # mixed lengths: one token, a block's end exactly, inside a block, several 512-key partitions
    lens = [1, 16, 37, 1300, 512, 700]
    hq = 6 if head_map is None else len(head_map)
    q, kc, vc, tables, rows, kv_lens, per_seq = _case(lens, hq=hq, dtype=dtype)
    heads = HeadGroups.of(hq, 2, head_map)
    scale = 0.3
    fn = paged_decode if impl == "kernel" else paged_decode_torch
    out, lse = fn(q, kc, vc, tables, rows, kv_lens, max(lens), heads, scale, window)
    ro, rl = _reference(q, kc, vc, per_seq, kv_lens, heads, scale, window)
    assert out.shape == q.shape and lse.dtype == torch.float32
    assert (out - ro).abs().max() <= 2e-5
    assert (lse - rl).abs().max() <= 2e-5


@pytest.mark.parametrize("d,head_map", [(64, None), (128, [0, 0, 0, 1, 1, 1, 2, 2, 2])])
def test_bf16_queries_over_a_bf16_cache_at_real_head_sizes(d, head_map):
    # the kernel's bf16 dot-product scores (on CPUs with AVX512-BF16): bf16 products are exact, so the scores
    # match the fp32 reference of the same bf16 values; lengths around its 16-key chunks and 512-key partitions
    lens = [1, 15, 16, 17, 33, 600]
    hq, hkv = (6, 2) if head_map is None else (9, 3)
    q, kc, vc, tables, rows, kv_lens, per_seq = _case(lens, hq=hq, hkv=hkv, d=d, dtype=torch.bfloat16, seed=3)
    heads = HeadGroups.of(hq, hkv, head_map)
    out, lse = paged_decode(q.bfloat16(), kc, vc, tables, rows, kv_lens, max(lens), heads, d ** -0.5)
    ro, rl = _reference(q.bfloat16().float(), kc, vc, per_seq, kv_lens, heads, d ** -0.5)
    assert (lse - rl).abs().max() <= 2e-5
    assert (out.float() - ro).abs().max() <= 1e-2  # the output's bf16 rounding


def test_head_dims_beyond_the_kernel_go_to_the_torch_twin():
    # the kernel holds a key row in at most 8 vectors (head_dim <= 128); a 256-wide head must still decode
    q, kc, vc, tables, rows, kv_lens, per_seq = _case([3, 40], d=256)
    heads = HeadGroups.of(6, 2)
    out, lse = paged_decode(q, kc, vc, tables, rows, kv_lens, 40, heads, 0.1)
    ro, rl = _reference(q, kc, vc, per_seq, kv_lens, heads, 0.1)
    assert (out - ro).abs().max() <= 2e-5 and (lse - rl).abs().max() <= 2e-5


def test_paged_decode_bf16_queries_and_empty_batch():
    q, kc, vc, tables, rows, kv_lens, per_seq = _case([5, 90], dtype=torch.bfloat16)
    heads = HeadGroups.of(6, 2)
    out, lse = paged_decode(q.bfloat16(), kc, vc, tables, rows, kv_lens, 90, heads, 0.2)
    ro, rl = _reference(q.bfloat16().float(), kc, vc, per_seq, kv_lens, heads, 0.2)
    assert out.dtype == torch.bfloat16 and (out.float() - ro).abs().max() <= 2e-2 and (lse - rl).abs().max() <= 1e-4
    e_out, e_lse = paged_decode(q[:0], kc, vc, tables, rows[:0], kv_lens[:0], 0, heads, 0.2)
    assert e_out.shape == (0, 6, 32) and e_lse.shape == (0, 6)


def test_paged_decode_refuses_bad_tables():
    q, kc, vc, tables, rows, kv_lens, _ = _case([20, 30])
    heads = HeadGroups.of(6, 2)
    with pytest.raises(RuntimeError, match="table row out of range"):
        torch.ops.csps.paged_decode(q, kc, vc, tables, rows + 100, kv_lens, heads.offsets, heads.q_index, 1.0, 0, 512)
    with pytest.raises(RuntimeError, match="beyond the table"):
        torch.ops.csps.paged_decode(q, kc, vc, tables, rows, kv_lens * 1000, heads.offsets, heads.q_index, 1.0, 0,
                                    512)


def test_head_groups():
    g = HeadGroups.of(9, 3)
    assert g.grouped and g.kv_of_q.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and g.offsets.tolist() == [0, 3, 6, 9]
    u = HeadGroups.of(5, 2, [0, 1, 0, 1, 1])
    assert not u.grouped and u.offsets.tolist() == [0, 2, 5] and u.q_index.tolist() == [0, 2, 1, 3, 4]


@pytest.mark.parametrize("head_map", [None, [0, 0, 1]])
def test_local_attention_decodes_and_prefill_in_one_step(head_map):
    # a step of three decodes (long, ending exactly at a block, short) and a prefill chunk on top of cached
    # KV, with the rank's block tables kept from plans: every row matches the reference attention
    from csps.core.plan import SeqWork, StepPlan
    from csps.engine.block_tables import RankBlockTables
    from csps.engine.paged_attention import KVCacheTensors, LocalAttention

    bs, hkv, d = 16, 2, 16
    hq = 6 if head_map is None else len(head_map)
    cache = KVCacheTensors(1, 400, bs, hkv, d, torch.float32)
    cache.k[0].copy_(rand(400, bs, hkv, d))
    cache.v[0].copy_(rand(400, bs, hkv, d))
    lens = [1100, 1024, 100]
    tables = [[b for s in (300, 10, 200, 120) for b in range(s, s + 20)][:69], list(range(31, 31 + 64)),
              list(range(250, 257))]
    prefill_table = list(range(140, 150))  # 100 cached tokens + a 50-token chunk
    rt = RankBlockTables(max_blocks_per_seq=80, num_rows=2)  # rows grow as requests arrive
    seqs = [SeqWork(req_id=str(i), token_ids=[1], pos=[(n - 1, n)], new_block_ids=t, num_kv_before=n - 1,
                    is_decode=True) for i, (n, t) in enumerate(zip(lens, tables))]
    seqs.append(SeqWork(req_id="p", token_ids=[1] * 50, pos=[(100, 150)], new_block_ids=prefill_table,
                        num_kv_before=100))
    rt.apply(StepPlan(step_id=1, seqs=seqs))
    q, k_new, v_new = rand(53, hq, d), rand(53, hkv, d), rand(53, hkv, d)
    attn = LocalAttention(seqs, rt, cache, d**-0.5, HeadGroups.of(hq, hkv, head_map))
    out = attn(0, q, k_new, v_new)
    idx = torch.arange(hq) // (hq // hkv) if head_map is None else torch.tensor(head_map)
    cases = [(i, n, t, [n - 1]) for i, (n, t) in enumerate(zip(lens, tables))]
    cases.append((slice(3, 53), 150, prefill_table, list(range(100, 150))))
    for rows, n, t, q_pos in cases:
        kk = cache.k[0][t].flatten(0, 1)[:n][:, idx]  # read after the step wrote its new tokens
        vv = cache.v[0][t].flatten(0, 1)[:n][:, idx]
        qq = q[rows].reshape(-1, hq, d)
        ro, _ = attention_ref(qq, kk, vv, torch.tensor(q_pos), torch.arange(n), d**-0.5)
        assert (out[rows].reshape(-1, hq, d) - ro).abs().max() <= 1e-5


def test_rank_block_tables_rows_follow_plans():
    from csps.core.plan import SeqWork, StepPlan
    from csps.engine.block_tables import RankBlockTables

    rt = RankBlockTables(max_blocks_per_seq=4, num_rows=1)
    w = lambda r, new: SeqWork(req_id=r, token_ids=[1], pos=[(0, 1)], new_block_ids=new, num_kv_before=0)  # noqa: E731
    rt.apply(StepPlan(step_id=1, seqs=[w("a", [3, 4]), w("b", [7])]))
    assert rt.tensor.shape[0] == 2 and rt.tensor[rt.row_of["a"]].tolist() == [3, 4, 0, 0]
    rt.apply(StepPlan(step_id=2, seqs=[w("a", [9])], free_req_ids=["b"]))
    assert rt["a"] == [3, 4, 9] and "b" not in rt.row_of and rt.tensor[1 - rt.row_of["a"]].tolist() == [0] * 4
    with pytest.raises(ValueError, match="beyond"):
        rt.apply(StepPlan(step_id=3, seqs=[w("a", [10, 11])]))
    # consecutive blocks are one slab of the cache (read without a gather), tracked as plans arrive
    rt.apply(StepPlan(step_id=4, seqs=[w("c", [20, 21]), w("d", [30, 32])]))
    assert rt.span("c", 2) == (20, 2) and rt.span("d", 2) is None and rt.span("a", 3) is None
    rt.apply(StepPlan(step_id=5, seqs=[w("c", [22]), w("e", [40])]))
    assert rt.span("c", 3) == (20, 3) and rt.span("e", 1) == (40, 1)
    rt.apply(StepPlan(step_id=6, seqs=[w("c", [24])]))
    assert rt.span("c", 4) is None and rt.block_ids("c", 4).tolist() == [20, 21, 22, 24]


def test_an_engine_pins_its_threads_and_gives_the_cpus_back():
    import os

    from csps import LLM

    before = os.sched_getaffinity(0)
    with LLM("dummy:tiny", dtype="float32", max_model_len=256) as llm:
        threads = torch.get_num_threads()
        if len(before) >= threads:  # the main thread is compute thread 0: pinned to the first CPU
            assert os.sched_getaffinity(0) == {sorted(before)[0]}
        assert llm.generate([[5, 6, 7]], use_tqdm=False)[0].token_ids
    assert os.sched_getaffinity(0) == before
