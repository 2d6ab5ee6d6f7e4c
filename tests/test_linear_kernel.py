"""Linear layers: the C++ few-rows kernel (``csps::linear_rows``) and ``csps.kernels.linear``'s dispatch against
their plain-torch twin ``F.linear``, in fp32 and bf16, for every row count the dispatch sends to each path."""

import pytest
import torch
import torch.nn.functional as F

from csps.kernels import cpu_ext
from csps.kernels.linear import MAX_KERNEL_ROWS, linear, max_kernel_rows, max_left_w_rows


def test_linear_kernel_builds_on_this_machine():
    assert cpu_ext.load() is None, f"the C++ CPU kernels did not build: {cpu_ext.load()}"
    assert hasattr(torch.ops.csps, "linear_rows")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 7, 8, 9, 16, 31, 40])
@pytest.mark.parametrize("with_bias", [False, True])
def test_linear_rows_matches_f_linear(dtype, rows, with_bias):
    # in = 67: not a multiple of the kernel's 8 lanes; out = 70: not a multiple of its 32-row tiles
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 67, generator=g).to(dtype)
    w = torch.randn(70, 67, generator=g).to(dtype)
    bias = torch.randn(70, generator=g).to(dtype) if with_bias else None
    got = torch.ops.csps.linear_rows(x, w, bias)
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())  # fp32 accumulation, as the kernel
    assert got.dtype == dtype and got.shape == (rows, 70)
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: one rounding of the output
    torch.testing.assert_close(got.float(), ref, rtol=tol, atol=tol * 8)


def test_linear_rows_rejects_bad_operands():
    w = torch.randn(4, 8)
    for x, bias in ((torch.randn(2, 7), None), (torch.randn(2, 8).bfloat16(), None), (torch.randn(2, 8), torch.randn(3))):
        with pytest.raises(RuntimeError, match="linear_rows"):
            torch.ops.csps.linear_rows(x, w, bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_linear_dispatch_matches_f_linear_on_every_path(dtype):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(96, 48, generator=g).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    # the kernel's range, (W @ x^T)^T's and F.linear's
    for rows in {1, max(1, max_kernel_rows(dtype)), max_kernel_rows(dtype) + 1, max(1, max_left_w_rows()),
                 max_left_w_rows() + 1, 300}:
        x = torch.randn(rows, 48, generator=g).to(dtype)
        for b in (None, bias):
            got, ref = linear(x, w, b), F.linear(x, w, b)
            assert got.shape == ref.shape and got.dtype == dtype and got.is_contiguous()
            tol = 1e-4 if dtype == torch.float32 else 3e-2
            torch.testing.assert_close(got.float(), ref.float(), rtol=tol, atol=tol * 8)


def test_kernel_rows_follow_the_cpu_capability():
    assert max_kernel_rows(torch.float32, "AVX2") == MAX_KERNEL_ROWS["AVX2"][torch.float32]
    assert max_kernel_rows(torch.bfloat16, "AVX512", "Intel") == MAX_KERNEL_ROWS["AVX512"][torch.bfloat16] == 2
    assert max_kernel_rows(torch.bfloat16, "AVX512", "AMD") == 8
    assert max_kernel_rows(torch.float32, "AVX512") == 0
    assert max_kernel_rows(torch.float32, "DEFAULT") == MAX_KERNEL_ROWS["AVX2"][torch.float32]  # unknown: AVX2's
    assert max_kernel_rows(torch.float16, "AVX2") == 0  # a dtype the kernel lacks never reaches it
    assert max_left_w_rows("AVX2", "AMD") == 256 and max_left_w_rows("AVX512", "Intel") == 16
    assert max_left_w_rows("AVX512", "AMD") == 0 and max_left_w_rows("DEFAULT", "") == 256


def test_the_cpu_vendor_comes_from_cpuinfo():
    from csps.kernels import cpu_ext

    with open("/proc/cpuinfo") as f:
        vendor_id = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    assert cpu_ext.cpu_vendor() == {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(vendor_id, "")
