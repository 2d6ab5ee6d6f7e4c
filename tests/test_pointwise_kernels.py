"""The fused pointwise kernels (RMSNorm, residual add + RMSNorm, RoPE in place) and SiLU(gate) * up against their
plain-torch twins, in fp32 and bf16, on shapes that are not multiples of any vector width."""

import pytest
import torch
import torch.nn.functional as F

from csps.kernels import cpu_ext
from csps.kernels.activation import silu_mul
from csps.kernels.norm import add_rms_norm_, rms_norm, rms_norm_ref
from csps.kernels.rope import RopeScaling, apply_rope, apply_rope_, rope_cos_sin, rope_inv_freq

DTYPES = [torch.float32, torch.bfloat16]


def close(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    else:  # one bf16 rounding apart at most (fp32 sums in another order)
        torch.testing.assert_close(got.float(), want.float(), rtol=2 ** -7, atol=2 ** -7)


def test_pointwise_kernels_are_built():
    assert cpu_ext.load() is None, cpu_ext.load()
    for op in ("rms_norm", "add_rms_norm_", "rope_"):
        assert hasattr(torch.ops.csps, op)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 5, 67])
def test_rms_norm_matches_llama_definition(dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 77, generator=g) * 3).to(dtype)
    w = torch.randn(77, generator=g).to(dtype)
    close(torch.ops.csps.rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))
    close(rms_norm(x, w, 1e-5), rms_norm_ref(x, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_normalises_it(dtype):
    g = torch.Generator().manual_seed(0)
    base = torch.randn(9, 1, 77, generator=g).to(dtype)[:, 0]  # rows strided like a view
    x, delta = base.clone(), torch.randn(9, 77, generator=g).to(dtype)
    w = torch.randn(77, generator=g).to(dtype)
    h = add_rms_norm_(x, delta, w, 1e-6)
    want_x = base + delta  # one rounding in x's dtype, as torch's add
    assert torch.equal(x, want_x)
    close(h, rms_norm_ref(want_x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_mul_is_silu_of_gate_times_up(dtype):
    g = torch.Generator().manual_seed(1)
    gate_up = (torch.randn(13, 2 * 45, generator=g) * 4).to(dtype)
    assert torch.equal(silu_mul(gate_up), F.silu(gate_up[:, :45]) * gate_up[:, 45:])


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_in_place_on_a_strided_view_matches_the_twin(dtype):
    # q and k heads as the model rotates them: a view into a fused QKV output whose rows are wider
    t, hq, hkv, d = 11, 3, 1, 10
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=g).to(dtype)
    v_before = qkv[:, (hq + hkv) * d :].clone()
    inv_freq, factor = rope_inv_freq(d, 10000.0, RopeScaling())
    cos, sin = rope_cos_sin(torch.arange(100, 100 + t), inv_freq, factor, dtype)
    qk = qkv[:, : (hq + hkv) * d].view(t, hq + hkv, d)
    want = apply_rope(qk.clone(), cos, sin)
    got = apply_rope_(qk, cos, sin)
    assert got.data_ptr() == qkv.data_ptr()  # in place
    close(got, want)
    assert torch.equal(qkv[:, (hq + hkv) * d :], v_before)  # V untouched


def test_kernels_reject_bad_operands():
    with pytest.raises(RuntimeError, match="rms_norm"):
        torch.ops.csps.rms_norm(torch.randn(2, 8), torch.randn(7), 1e-5)
    with pytest.raises(RuntimeError, match="rope_"):
        torch.ops.csps.rope_(torch.randn(2, 1, 8), torch.randn(3, 8), torch.randn(3, 8))


def test_fallbacks_outside_the_kernels_dtypes():
    # float16 is not a kernel dtype: the torch twins run, with the same results
    x = torch.randn(4, 16).half()
    w = torch.randn(16).half()
    torch.testing.assert_close(rms_norm(x, w, 1e-5).float(), rms_norm_ref(x, w, 1e-5).float(), rtol=1e-2, atol=1e-2)
    qk, cos, sin = torch.randn(3, 2, 8).half(), torch.randn(3, 8).half(), torch.randn(3, 8).half()
    want = apply_rope(qk.clone(), cos, sin)
    assert torch.equal(apply_rope_(qk, cos, sin), want)
