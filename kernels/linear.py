"""Linear layers: ``linear(x, w, bias)`` = x @ wᵀ (+ bias), w in torch's layout [out, in]; the device dispatch.

A step's linear layers multiply its T new tokens by every weight matrix, so their cost follows T
(``benchmarks/cpu_kernels.py linear`` measures all of this on SmolLM2's 30 layers):
  * CPU, few rows (decode steps): ``torch.ops.csps.linear_rows``, the C++ kernel that streams W once at the
    memory's bandwidth and dots each W row with every row of x; MKL's GEMM paths read the weights at a
    fraction of it for so few rows on AMD Zen 3 (AVX2, fp32: 1 row 18 vs 27 ms, 8 rows 36 vs 73 ms, 24 rows
    75 vs 89 ms); on AVX-512 Intel CPUs only bf16 weights for 1-2 rows, on AMD AVX-512 ones up to 8 (bf16 products
    by vdpbf16ps where the CPU has AVX512-BF16; Zen 5, 30 layers: 1/4/8 rows 7.1/8.6/9.9 vs 11.7/12.3/13.8 ms)
    (``MAX_KERNEL_ROWS``);
  * CPU, up to a few hundred rows on AVX2: (W @ xᵀ)ᵀ, W as MKL's left operand (25% faster at 32 rows than x @ Wᵀ);
    on Intel AVX-512 up to 16 rows; never on AMD AVX-512 (Zen 5, bf16: 8 rows 18.8 vs 11.0 ms for F.linear);
  * CPU prefill chunks and CUDA: ``F.linear`` (cuBLAS takes either operand order at the same speed).
``F.linear`` is the plain-torch twin every path is tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from csps.kernels import cpu_ext

# the most rows the C++ kernel takes, by torch's CPU capability (benchmarks/cpu_kernels.py linear, 30 layers of
# distinct weights): on AVX2 (AMD Zen 3, where MKL leaves its fast paths to Intel CPUs) the kernel wins up to 32
# rows; on AVX-512 (Intel Sapphire Rapids) MKL/oneDNN read fp32 weights at the memory's bandwidth already (1 row:
# kernel 25 ms, MKL 22.5 ms), and bf16 ones only for 1-2 rows slower than the kernel (1 row: 19.0 vs 23.8 ms)
MAX_KERNEL_ROWS = {"AVX2": {torch.float32: 32, torch.bfloat16: 4},
                   "AVX512": {torch.float32: 0, torch.bfloat16: 2},
                   ("AVX512", "AMD"): {torch.float32: 0, torch.bfloat16: 8}}
# the most rows computed as (W @ x^T)^T, W as MKL's left operand (25% faster at 32 rows on AVX2); on Intel AVX-512
# F.linear is as fast from ~24 rows (bf16, 30 layers: 8 rows 18 vs 22 ms, 32 rows 26 vs 24 ms, 128 rows 62 vs 51 ms);
# on AMD AVX-512 (Zen 5, bf16) F.linear wins from 4 rows: 4/8/16 rows 10.0/11.0/13.2 ms vs 18.6/18.8/20.8 ms.
# Keys: torch's CPU capability, or (capability, vendor) where the vendors differ.
MAX_LEFT_W_ROWS = {"AVX2": 256, "AVX512": 16, ("AVX512", "AMD"): 0}


def _for_cpu(table: dict, capability: str | None, vendor: str | None):
    """table's entry for (capability, vendor), else for the capability, else AVX2's (this CPU's by default)."""
    capability = capability or torch.backends.cpu.get_cpu_capability()
    vendor = cpu_ext.cpu_vendor() if vendor is None else vendor
    return table.get((capability, vendor), table.get(capability, table["AVX2"]))


@functools.cache
def max_kernel_rows(dtype: torch.dtype, capability: str | None = None, vendor: str | None = None) -> int:
    """The most rows ``linear`` sends to the C++ kernel on this CPU (``capability``: torch's, e.g. 'AVX2';
    ``vendor``: 'AMD', 'Intel' or '')."""
    return _for_cpu(MAX_KERNEL_ROWS, capability, vendor).get(dtype, 0)


@functools.cache
def max_left_w_rows(capability: str | None = None, vendor: str | None = None) -> int:
    """The most rows ``linear`` computes as (W @ x^T)^T on this CPU (``vendor``: 'AMD', 'Intel' or '')."""
    return _for_cpu(MAX_LEFT_W_ROWS, capability, vendor)


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    # x: [T, in], w: [out, in] contiguous, bias: [out] -> [T, out]
    if x.is_cuda:
        return F.linear(x, w, bias)
    rows = x.shape[0]
    if 0 < rows <= max_kernel_rows(w.dtype) and x.dtype == w.dtype and cpu_ext.available():
        return torch.ops.csps.linear_rows(x, w, bias)
    if rows <= max_left_w_rows():
        y = torch.mm(w, x.t()).t().contiguous()
        return y.add_(bias) if bias is not None else y
    return F.linear(x, w, bias)
