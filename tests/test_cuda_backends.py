"""CUDA backends (flash-attn, torch's CUDA SDPA kernels) and their torch fallbacks vs the fp32 reference.

On CPU: the fallbacks equal ``attention_ref`` (1e-5, fp32); flash-attn is reported missing (one
log line) and nothing imports it; the flash code paths (run decomposition, band windows, LSE
layout, paged/gathered decode) run against ``_FakeFlash``, a plain torch model of flash-attn's
documented semantics (bottom-right band masks, lse [B, H, Tq], +inf LSE for rows without keys, the
paged block-size check), and the torch CUDA path (``sdpa_with_lse``) against models of the two aten
ops it calls (their layouts, the efficient kernel's LSE padded to 32 rows). The fakes are passed in
as arguments. Tests marked ``cuda`` run the real kernels on a GPU and are skipped here.
"""

import importlib.util
import logging
import subprocess
import sys

import csps.kernels.cuda_attention as ca
import pytest
import torch
from _dist import TOL, max_err, rand, rand_qkv
from csps.kernels import attention_ref, gather_kv
from csps.kernels.cuda_sdpa import sdpa_with_lse
from csps.parallel import shard_indices, zigzag_shards

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
def test_prefill_matches_ref(case, window, emulated):
    q_pos, k_pos = PREFILL_CASES[case]
    fake = _FakeFlash()
    for seed, (hq, hkv) in enumerate([(6, 2), (4, 4)]):
        q, k, v = rand_qkv(seed, len(q_pos), len(k_pos), hq, hkv, D)
        # emulated: the flash path, with the kernel replaced by its torch model
        out, lse = ca.flash_prefill(q, k, v, q_pos, k_pos, 0.4, window, flash=fake if emulated else None)
        ref_o, ref_l = attention_ref(q, k, v, q_pos, k_pos, 0.4, window)
        assert out.dtype == q.dtype and lse.dtype == torch.float32 and lse.shape == ref_l.shape
        assert max_err(out, ref_o) <= TOL and max_err(lse, ref_l) <= TOL, (case, window)
    assert bool(fake.calls) == (emulated and bool(ref_l.isfinite().any()))  # no call when no key is seen
    if emulated and case == "chunk_on_cache":  # the native case: one causal call per head config
        assert len(fake.calls) == 2


def test_cpu_tensors_never_reach_flash():
    q, k, v = rand_qkv(0, 5, 9, 4, 2, D)
    assert ca._native(q, k, v) is None  # whether or not flash-attn is installed


# -- torch's CUDA kernels (no flash-attn) -------------------------------------------------------------

def _sdpa_model(q, k, v, bias, causal, scale):
    # q/k/v: [1, H, T, D] (equal heads: the caller repeats KV heads) -> out [1, H, Tq, D], lse [1, H, Tq]
    assert q.shape[1] == k.shape[1] and (not causal or q.shape[2] == k.shape[2])
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if bias is not None:
        s = s + bias.float()
    if causal:
        s = s.masked_fill(torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).triu(1), -INF)
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.softmax(s, -1), v.float())  # NaN where no key: as the kernels
    return out.to(q.dtype), lse


def _flash_op(q, k, v, dropout_p=0.0, is_causal=False, return_debug_mask=False, *, scale=None):
    assert dropout_p == 0.0 and q.dtype in (torch.float16, torch.bfloat16)
    out, lse = _sdpa_model(q, k, v, None, is_causal, scale)
    return out, lse, None, None, q.shape[2], k.shape[2], None, None, None


def _efficient_op(q, k, v, attn_bias, compute_log_sumexp, dropout_p=0.0, is_causal=False, *, scale=None):
    assert compute_log_sumexp and dropout_p == 0.0
    out, lse = _sdpa_model(q, k, v, attn_bias, is_causal, scale)
    padded = -(-q.shape[2] // 32) * 32  # the kernel's LSE rows come in multiples of 32
    lse = torch.cat([lse, torch.full((*lse.shape[:2], padded - q.shape[2]), 123.0)], -1)
    return out, lse, None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("masked", [False, True])
def test_sdpa_with_lse_layouts_gqa_and_padding(dtype, masked):
    q, k, v = (x.to(dtype) for x in rand_qkv(2, 37, 37 if not masked else 50, 6, 2, D))
    mask = torch.rand(37, k.shape[0], generator=torch.Generator().manual_seed(4)) > 0.3 if masked else None
    bias = None if mask is None else torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, -INF)[None, None]
    causal = not masked
    out, lse = sdpa_with_lse(q, k, v, 0.3, causal, bias, flash_op=_flash_op, efficient_op=_efficient_op)
    q_pos, k_pos = torch.arange(37), torch.arange(k.shape[0])
    ref_o, ref_l = attention_ref(q.float(), k.float(), v.float(), q_pos, k_pos if causal else None, 0.3) \
        if not masked else (None, None)
    if masked:  # the reference by hand: scores over the visible keys only
        s = torch.einsum("qhd,khd->hqk", q.float(), k.float().repeat_interleave(3, 1)) * 0.3
        s = s.masked_fill(~mask[None], -INF)
        ref_l = torch.logsumexp(s, -1).transpose(0, 1)
        ref_o = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.float().repeat_interleave(3, 1))
    tol = TOL if dtype == torch.float32 else BF16_TOL
    assert out.shape == q.shape and out.dtype == dtype and lse.shape == (37, 6) and lse.dtype == torch.float32
    assert max_err(out.float(), ref_o) <= tol and max_err(lse, ref_l) <= 1e-3


# -- paged decode ---------------------------------------------------------------------------------

@pytest.mark.parametrize("block_size", [4, 256])
@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("emulated", [False, True])
def test_decode_paged_matches_ref(block_size, window, emulated):
    fake = _FakeFlash()
    lens = [5, 1, 0, 2 * block_size + 3]
    nb = -(-max(lens) // block_size)
    k_cache = rand(1, 1 + len(lens) * nb, block_size, 2, D)
    v_cache = rand(2, 1 + len(lens) * nb, block_size, 2, D)
    perm = torch.randperm(len(lens) * nb, generator=torch.Generator().manual_seed(3)) + 1
    tables = perm.view(len(lens), nb)  # every sequence owns nb shuffled blocks (block 0 unused)
    q = rand(4, len(lens), 6, D)
    out, lse = ca.flash_decode_paged(q, k_cache, v_cache, tables, torch.tensor(lens), 0.3, window,
                                     flash=fake if emulated else None)
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
    with caplog.at_level(logging.INFO):
        assert not ca.flash_available() and not ca.flash_available()
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("csps.")]
    assert lines == ["flash-attn not installed: using the torch attention path"]


def test_importing_the_backends_imports_no_cuda_package():
    code = (
        "import sys\n"
        "import csps.kernels.cuda_attention as ca\n"
        "bad = lambda: sorted(m for m in sys.modules if m.split('.')[0] in ('flash_attn',))\n"
        "assert bad() == [], bad()\n"
        "ca.flash_available()\n"
        "print(bad())\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    if importlib.util.find_spec("flash_attn") is None:
        assert res.stdout.strip() == "[]"


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
