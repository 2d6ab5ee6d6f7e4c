"""CUDA backends (flash-attn, ring-flash-attn) and their torch fallbacks vs the fp32 reference.

On CPU: the fallbacks equal ``attention_ref`` (1e-5, fp32); flash-attn is reported missing (one
log line) and nothing imports it; the flash code paths (run decomposition, band windows, LSE
layout, paged/gathered decode, ring plumbing and byte counts) run against ``_FakeFlash``, a plain
torch model of flash-attn's documented semantics (bottom-right band masks, lse [B, H, Tq], +inf
LSE for rows without keys, the paged block-size check). Tests marked ``cuda`` run the real
kernels on a GPU and are skipped here.
"""

import importlib.util
import logging
import subprocess
import sys

import csps.kernels.cuda_attention as ca
import csps.parallel.cuda_ring as cr
import pytest
import torch
import torch.distributed as dist
from _dist import SPAWN_TIMEOUT_S, TOL, max_err, rand, rand_qkv, world_comm
from csps.kernels import attention_ref, gather_kv
from csps.parallel import Comm, ring_attention, shard_indices, spawn, zigzag_shards

D = 8
BF16_TOL = 2e-2  # bf16 inputs and bf16 out rounding vs the fp32 reference on the same inputs
INF = float("inf")


# -- a torch model of flash-attn's documented semantics ------------------------------------------

def _band(tq: int, tk: int, causal: bool, window_size) -> torch.Tensor:
    """Query i sees key j iff i + tk - tq - left <= j <= i + tk - tq + right (-1: unbounded)."""
    left, right = window_size
    right = 0 if causal else right
    diff = torch.arange(tk)[None, :] - torch.arange(tq)[:, None] - (tk - tq)  # j - i - (tk - tq)
    vis = torch.ones(tq, tk, dtype=torch.bool)
    if right >= 0:
        vis &= diff <= right
    if left >= 0:
        vis &= diff >= -left
    return vis


def _attend(q, k, v, vis, scale):
    # q: [Tq, H, D], k/v: [Tk, Hk, D] -> out [Tq, H, D] (q dtype), lse [H, Tq] (+inf: no key)
    g = q.shape[1] // k.shape[1]
    s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(g, 1)) * scale
    s = s.masked_fill(~vis[None], -INF)
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - lse[..., None]).nan_to_num(0.0)
    out = torch.einsum("hqk,khd->qhd", p, v.float().repeat_interleave(g, 1))
    return out.to(q.dtype), lse.masked_fill(torch.isinf(lse), INF)


class _FakeFlash:
    __version__ = "2.8.3"

    def __init__(self):
        self.calls = []

    def flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                        window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                        return_attn_probs=False):
        assert q.shape[2] % k.shape[2] == 0 and dropout_p == 0.0
        self.calls.append(("func", q.shape[1], k.shape[1], tuple(window_size)))
        vis = _band(q.shape[1], k.shape[1], causal, window_size)
        outs, lses = zip(*(_attend(q[b], k[b], v[b], vis, softmax_scale) for b in range(q.shape[0])))
        out, lse = torch.stack(outs), torch.stack(lses)
        return (out, lse, None) if return_attn_probs else out

    def flash_attn_with_kvcache(self, q, k_cache, v_cache, k=None, v=None, rotary_cos=None,
                                rotary_sin=None, cache_seqlens=None, cache_batch_idx=None,
                                cache_leftpad=None, block_table=None, softmax_scale=None,
                                causal=False, window_size=(-1, -1), softcap=0.0,
                                rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                                return_softmax_lse=False):
        assert cache_seqlens.dtype == torch.int32 and k is None
        if block_table is not None:
            assert block_table.dtype == torch.int32
            assert k_cache.shape[1] % 256 == 0, "Paged KV cache block size must be divisible by 256"
            k_cache, v_cache = (c[block_table.long()].flatten(1, 2) for c in (k_cache, v_cache))
        self.calls.append(("kvcache", block_table is not None))
        outs, lses = [], []
        for b, n in enumerate(cache_seqlens.tolist()):
            vis = _band(q.shape[1], n, causal, window_size)
            o, l = _attend(q[b], k_cache[b, :n], v_cache[b, :n], vis, softmax_scale)
            outs.append(o)
            lses.append(l)
        out, lse = torch.stack(outs), torch.stack(lses)
        return (out, lse) if return_softmax_lse else out


def test_fake_flash_follows_the_documented_masks():
    assert _band(2, 5, True, (-1, -1)).int().tolist() == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    assert _band(5, 2, True, (-1, -1)).int().tolist() == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]
    assert _band(3, 3, False, (1, 0)).int().tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


# -- prefill ----------------------------------------------------------------------------------------

def _zigzag(n, p, r):
    return shard_indices(zigzag_shards(n, p)[r])


def _striped(n, p, r, g):  # csps SP KV placement: granules of g, zigzag within stripes of 2pg
    pos = torch.arange(n)
    piece = (pos // g) % (2 * p)
    return pos[(piece == r) | (piece == 2 * p - 1 - r)]


PREFILL_CASES = {  # name: (q_pos, k_pos)
    "chunk_on_cache": (torch.arange(37, 60), torch.arange(60)),
    "whole_prompt": (torch.arange(40), torch.arange(40)),
    "cache_only": (torch.arange(37, 60), torch.arange(37)),
    "keys_after_queries": (torch.arange(10), torch.arange(20, 30)),
    "zigzag_own": (_zigzag(40, 2, 0), _zigzag(40, 2, 0)),
    "zigzag_other": (_zigzag(40, 2, 0), _zigzag(40, 2, 1)),
    "uneven_zigzag": (_zigzag(43, 4, 3), _zigzag(43, 4, 1)),
    "striped_kv": (_zigzag(20, 2, 1) + 40, _striped(60, 2, 1, 4)),
    "shuffled": (torch.randperm(30, generator=torch.Generator().manual_seed(0))[:17],
                 torch.randperm(30, generator=torch.Generator().manual_seed(1))[:22]),
}


@pytest.mark.parametrize("window", [None, 1, 5, 30, 100])
@pytest.mark.parametrize("case", sorted(PREFILL_CASES))
@pytest.mark.parametrize("emulated", [False, True])
def test_prefill_matches_ref(monkeypatch, case, window, emulated):
    q_pos, k_pos = PREFILL_CASES[case]
    fake = _FakeFlash()
    if emulated:  # the flash path, with the kernel replaced by its torch model
        monkeypatch.setattr(ca, "_native", lambda q, k, v: fake)
    for seed, (hq, hkv) in enumerate([(6, 2), (4, 4)]):
        q, k, v = rand_qkv(seed, len(q_pos), len(k_pos), hq, hkv, D)
        out, lse = ca.flash_prefill(q, k, v, q_pos, k_pos, 0.4, window)
        ref_o, ref_l = attention_ref(q, k, v, q_pos, k_pos, 0.4, window)
        assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == ref_l.shape
        assert max_err(out, ref_o) <= TOL and max_err(lse, ref_l) <= TOL, (case, window)
    assert bool(fake.calls) == (emulated and bool(ref_l.isfinite().any()))  # no call when no key is seen
    if emulated and case == "chunk_on_cache":  # the native case: one causal call per head config
        assert len(fake.calls) == 2


def test_cpu_tensors_never_reach_flash(monkeypatch):
    fake = _FakeFlash()
    monkeypatch.setattr(ca, "_flash_module", lambda: fake)
    q, k, v = rand_qkv(0, 5, 9, 4, 2, D)
    ca.flash_prefill(q, k, v, torch.arange(4, 9), torch.arange(9))
    assert fake.calls == [] and ca._native(q, k, v) is None


# -- paged decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 256])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("emulated", [False, True])
def test_decode_paged_matches_ref(monkeypatch, block_size, window, emulated):
    fake = _FakeFlash()
    if emulated:
        monkeypatch.setattr(ca, "_native", lambda q, k, v: fake)
    lens = [5, 1, 0, 2 * block_size + 3]
    nb = -(-max(lens) // block_size)
    k_cache = rand(1, 1 + len(lens) * nb, block_size, 2, D)
    v_cache = rand(2, 1 + len(lens) * nb, block_size, 2, D)
    perm = torch.randperm(len(lens) * nb, generator=torch.Generator().manual_seed(3)) + 1
    tables = perm.view(len(lens), nb)  # every sequence owns nb shuffled blocks (block 0 unused)
    q = rand(4, len(lens), 6, D)
    out, lse = ca.flash_decode_paged(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3, window)
    for b, n in enumerate(lens):
        k, v = gather_kv(k_cache, v_cache, tables[b], n)
        ref_o, ref_l = attention_ref(q[b][None], k, v, torch.tensor([n - 1]), torch.arange(n), 0.3, window)
        assert max_err(out[b], ref_o[0]) <= TOL and max_err(lse[b], ref_l[0]) <= TOL, (b, n)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == (len(lens), 6)
    if emulated:  # flash-attn 2 pages: only multiples of 256 go through block_table
        assert fake.calls == [("kvcache", block_size % 256 == 0)]


# -- availability, logging, lazy imports ---------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn installed")
def test_flash_missing_is_logged_once(caplog):
    ca._flash_module.cache_clear()
    cr._ring_flash_module.cache_clear()
    with caplog.at_level(logging.INFO):
        assert not ca.flash_available() and not ca.flash_available()
        assert not cr.ring_flash_available()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("csps.")]
    assert lines == ["flash-attn not installed: using the torch attention path"]


def test_importing_the_backends_imports_no_cuda_package():
    code = (
        "import sys\n"
        "import csps.kernels.cuda_attention as ca, csps.parallel.cuda_ring as cr\n"
        "bad = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('flash_attn', 'ring_flash_attn'))\n"
        "assert bad() == [], bad()\n"
        "ca.flash_available(); cr.ring_flash_available()\n"
        "print(bad())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if importlib.util.find_spec("flash_attn") is None:
        assert res.stdout.strip() == "[]"


# -- zigzag ring ------------------------------------------------------------------------------------

class _FakeRingFlash:
    """ring-flash-attn's zigzag entry point, computed by the csps ring on its own Comm."""

    def __init__(self, world_size):
        self.world_size = world_size

    def zigzag_ring_flash_attn_func(self, q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), alibi_slopes=None, deterministic=False,
                                    return_attn_probs=False, group=None):
        assert causal and return_attn_probs and window_size == (-1, -1) and group is dist.group.WORLD
        assert q.dim() == 4 and q.shape[0] == 1 and q.shape[1] % 2 == 0
        pos = [shard_indices(s) for s in zigzag_shards(q.shape[1] * self.world_size, self.world_size)]
        own_comm = world_comm(self.world_size)  # bytes counted there do not reach the caller's Comm
        o, l = ring_attention(q[0], pos[dist.get_rank()], k[0], v[0], pos, own_comm, scale=softmax_scale)
        return o[None], l.transpose(0, 1)[None], None


def _ring_rank(rank, world_size, n, emulated):
    comm = world_comm(world_size)
    if emulated:
        cr._ring_flash = lambda q, k, num_tokens, c: _FakeRingFlash(world_size)
    res = []
    for seed, (hq, hkv) in enumerate([(6, 2), (4, 4)]):
        q, k, v = rand_qkv(seed, n, n, hq, hkv, D)
        pos = torch.arange(n)
        ref_o, ref_l = attention_ref(q, k, v, pos, pos, 0.5)
        idx = [shard_indices(s) for s in zigzag_shards(n, world_size)]
        mine = idx[rank]
        comm.reset_step()
        o, l = cr.zigzag_ring_prefill(q[mine], k[mine], v[mine], comm, 0.5, num_tokens=n)
        expected = sum(2 * len(idx[j]) * hkv * D * 4 for j in range(world_size) if j != (rank + 1) % world_size)
        res.append(dict(out=max_err(o, ref_o[mine]), lse=max_err(l, ref_l[mine]),
                        bytes=comm.bytes_step.get("pass_kv", 0), expected=expected if world_size > 1 else 0,
                        dtypes=(o.dtype, l.dtype)))
    # ring-flash-attn is used only when the group's rank order is comm's (checked on every rank)
    res[0]["ranks_ok"] = world_size == 1 or dist.get_process_group_ranks(comm.process_group) == comm.ranks
    return res


@pytest.mark.parametrize("world_size, n, emulated", [
    (1, 20, False), (2, 40, False), (2, 41, False), (4, 43, False), (2, 40, True), (4, 48, True),
])
def test_zigzag_ring_prefill(world_size, n, emulated):
    for per_rank in spawn(_ring_rank, world_size, args=(n, emulated), timeout_s=SPAWN_TIMEOUT_S):
        for case in per_rank:
            assert case["out"] <= TOL and case["lse"] <= TOL, case
            assert case["bytes"] == case["expected"], case
            assert case["dtypes"] == (torch.float32, torch.float32)
        assert per_rank[0]["ranks_ok"]


def test_zigzag_ring_rejects_a_wrong_shard():
    q, k, v = rand_qkv(0, 7, 7, 2, 2, D)
    with pytest.raises(ValueError, match="zigzag shard"):
        cr.zigzag_ring_prefill(q, k, v, Comm.single(), num_tokens=9)


# -- on a GPU (skipped on CPU) ----------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _gpu(*xs):
    if not ca.flash_available():
        pytest.skip("flash-attn not installed")
    return [x.to("cuda", torch.bfloat16) for x in xs]


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("window", [None, 64])
@pytest.mark.parametrize("case", ["chunk_on_cache", "whole_prompt", "zigzag_other", "striped_kv"])
def test_cuda_flash_prefill(case, window):
    q_pos, k_pos = PREFILL_CASES[case]
    q_pos, k_pos = q_pos * 7, k_pos * 7  # longer runs: positions spaced out, then filled in below
    q_pos = (q_pos[:, None] + torch.arange(7)).flatten()
    k_pos = (k_pos[:, None] + torch.arange(7)).flatten()
    q, k, v = _gpu(*rand_qkv(0, len(q_pos), len(k_pos), 8, 2, 64))
    out, lse = ca.flash_prefill(q, k, v, q_pos, k_pos, None, window)
    ref_o, ref_l = attention_ref(q.cpu(), k.cpu(), v.cpu(), q_pos, k_pos, None, window)
    assert out.is_cuda and out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert max_err(out.cpu(), ref_o) <= BF16_TOL and max_err(lse.cpu(), ref_l) <= BF16_TOL


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("block_size", [16, 256])
@pytest.mark.parametrize("window", [None, 100])
def test_cuda_flash_decode_paged(block_size, window):
    lens = [1, 300, 700]
    nb = -(-max(lens) // block_size)
    k_cache, v_cache, q = _gpu(rand(1, 1 + 3 * nb, block_size, 2, 64),
                               rand(2, 1 + 3 * nb, block_size, 2, 64), rand(3, 3, 8, 64))
    tables = (torch.randperm(3 * nb, generator=torch.Generator().manual_seed(0)) + 1).view(3, nb)
    out, lse = ca.flash_decode_paged(q, k_cache, v_cache, tables.cuda(), torch.tensor(lens).cuda(), None, window)
    for b, n in enumerate(lens):
        k, v = gather_kv(k_cache.cpu(), v_cache.cpu(), tables[b], n)
        ref_o, ref_l = attention_ref(q[b][None].cpu(), k, v, torch.tensor([n - 1]), torch.arange(n), None, window)
        assert max_err(out[b].cpu(), ref_o[0]) <= BF16_TOL and max_err(lse[b].cpu(), ref_l[0]) <= BF16_TOL


def _nccl_ring_rank(rank, world_size, n):
    torch.cuda.set_device(rank)
    group = dist.new_group(list(range(world_size)), backend="nccl")  # the spawn world is gloo
    comm = Comm(group, list(range(world_size)))
    q, k, v = (x.to(torch.bfloat16) for x in rand_qkv(5, n, n, 8, 2, 64))
    pos = torch.arange(n)
    ref_o, ref_l = attention_ref(q, k, v, pos, pos)
    mine = shard_indices(zigzag_shards(n, world_size)[rank])
    o, l = cr.zigzag_ring_prefill(q[mine].cuda(), k[mine].cuda(), v[mine].cuda(), comm)
    return dict(out=max_err(o.cpu(), ref_o[mine]), lse=max_err(l.cpu(), ref_l[mine]),
                bytes=comm.bytes_total.get("pass_kv", 0), expected=(world_size - 1) * 2 * len(mine) * 2 * 64 * 2,
                used_ring_flash=cr.ring_flash_available())


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_cuda_zigzag_ring_nccl():
    if not cr.ring_flash_available():
        pytest.skip("ring-flash-attn not installed")
    for res in spawn(_nccl_ring_rank, 2, args=(512,), timeout_s=SPAWN_TIMEOUT_S):
        assert res["used_ring_flash"] and res["bytes"] == res["expected"], res
        assert res["out"] <= BF16_TOL and res["lse"] <= BF16_TOL, res
