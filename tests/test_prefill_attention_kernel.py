"""The C++ prefill-chunk attention (``torch.ops.csps.prefill_attention``) against the fp32 reference attention,
and when ``kernels.attention`` sends a call to it."""

import pytest
import torch

from csps.kernels import attention, attention_ref, cpu_ext
from csps.kernels.prefill import (has_bf16_dot, is_prefix_causal, kernel_capable, prefill_attention,
                                  uses_prefill_kernel)


def _case(tq, tk, hq, hkv, d, dtype, seed=0, strided=False):
    """A chunk of tq queries ending at key tk-1; q as the engine has it (a view into the fused qkv rows)
    when ``strided``."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        qkv = torch.randn(tq, (hq + 2 * hkv) * d, generator=g).to(dtype)
        q = qkv[:, : hq * d].view(tq, hq, d)
    else:
        q = torch.randn(tq, hq, d, generator=g).to(dtype)
    k = torch.randn(tk, hkv, d, generator=g).to(dtype)
    v = torch.randn(tk, hkv, d, generator=g).to(dtype)
    return q, k, v, torch.arange(tk - tq, tk), torch.arange(tk)


def _ref(q, k, v, q_pos, k_pos, scale):
    g = q.shape[1] // k.shape[1]
    kf, vf = (x.float().repeat_interleave(g, dim=1) for x in (k, v))
    return attention_ref(q.float(), kf, vf, q_pos, k_pos, scale)


@pytest.mark.parametrize("tq,tk,hq,hkv,d", [
    (512, 512, 9, 3, 64),    # SmolLM2's fresh chunk
    (37, 37, 4, 4, 64),      # a tail tile, no GQA
    (100, 1300, 9, 3, 64),   # a chunk on top of a cache, keys not a whole block
    (1, 70, 6, 2, 128),      # one query, the wider head
    (48, 200, 8, 1, 128),    # one KV head for all
])
@pytest.mark.parametrize("dtype,bf16_dot", [(torch.float32, False), (torch.bfloat16, False), (torch.bfloat16, True)])
def test_the_kernel_matches_the_fp32_reference(tq, tk, hq, hkv, d, dtype, bf16_dot):
    assert cpu_ext.load() is None, cpu_ext.load()
    q, k, v, q_pos, k_pos = _case(tq, tk, hq, hkv, d, dtype, strided=True)
    scale = d ** -0.5
    out, lse = prefill_attention(q, k, v, int(q_pos[0]), scale, bf16_dot=bf16_dot)
    ref_out, ref_lse = _ref(q, k, v, q_pos, k_pos, scale)
    assert out.dtype == dtype and out.shape == (tq, hq, d) and lse.dtype == torch.float32
    tol = 2e-5 if dtype == torch.float32 else 1e-2  # bf16: the output's rounding (inputs are exact in both)
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)


def test_the_bf16_dot_product_is_built_where_the_cpu_has_it():
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert has_bf16_dot() == ("avx512_bf16" in flags and "avx512f" in flags)


def test_the_first_query_sees_one_key_and_the_output_is_its_value():
    q, k, v, _, _ = _case(20, 20, 3, 3, 64, torch.float32)
    out, lse = prefill_attention(q, k, v, 0, 0.125)
    torch.testing.assert_close(out[0], v[0])
    torch.testing.assert_close(lse[0], (q[0] * k[0]).sum(-1) * 0.125)


def test_bad_inputs_are_refused_with_a_message():
    q, k, v, _, _ = _case(8, 8, 4, 2, 64, torch.float32)
    with pytest.raises(RuntimeError, match="queries past the keys"):
        prefill_attention(q, k, v, 1, 0.125)
    with pytest.raises(RuntimeError, match="head_dim must be 64 or 128"):
        prefill_attention(q[..., :32], k[..., :32], v[..., :32], 0, 0.125)
    with pytest.raises(RuntimeError, match="group evenly"):
        prefill_attention(q[:, :3], k, v, 0, 0.125)


def test_positions_the_kernel_takes():
    assert is_prefix_causal(torch.arange(10, 20), torch.arange(20))
    assert is_prefix_causal(torch.arange(0, 20), torch.arange(20))
    assert not is_prefix_causal(torch.arange(10, 20), torch.arange(19))  # queries past the keys
    assert not is_prefix_causal(torch.tensor([0, 1, 5, 6]), torch.arange(8))  # zigzag pieces
    assert not is_prefix_causal(torch.arange(4), torch.tensor([0, 1, 2, 4, 5]))  # not the whole prefix
    assert kernel_capable("AVX512") and not kernel_capable("AVX2")


def test_attention_dispatches_by_case_and_every_path_agrees():
    q, k, v, q_pos, k_pos = _case(64, 300, 9, 3, 64, torch.float32, seed=1)
    expect = kernel_capable() and cpu_ext.available()
    assert uses_prefill_kernel(q, k, q_pos, k_pos, None) == expect
    assert not uses_prefill_kernel(q, k, q_pos, k_pos, 128)  # sliding windows stay with torch
    assert not uses_prefill_kernel(q[..., :32], k[..., :32], q_pos, k_pos, None)
    out, lse = attention(q, k, v, q_pos, k_pos)
    ref_out, ref_lse = _ref(q, k, v, q_pos, k_pos, 64 ** -0.5)
    torch.testing.assert_close(out, ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse, ref_lse, atol=2e-5, rtol=2e-5)
