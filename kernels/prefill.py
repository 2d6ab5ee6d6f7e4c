"""Attention of one sequence's prefill chunk over its keys on CPU: the C++ kernel and when it is used.

The chunk's queries sit at consecutive positions, its keys are the sequence's whole prefix 0..Tk-1 (the
cached KV read in place, then the chunk's own), key j visible to query i iff j <= position(i): the case of
every chunked prefill on a rank that holds the whole sequence. ``torch.ops.csps.prefill_attention``
(``kernels/csrc/prefill_attention.cpp``) runs it as one flash-attention loop accumulating in fp32;
torch's CPU flash kernel (``attention_torch``, the plain-torch twin and what every other case runs) reaches
~0.08 TFLOP/s on SmolLM2's 64-wide heads, where attention was ~45% of a 512-token chunk's time (AMD Zen 5,
bf16, ``benchmarks/cpu_kernels.py prefill``).
"""

from __future__ import annotations

import functools

import torch

from csps.kernels import cpu_ext

HEAD_DIMS = (64, 128)  # the head sizes the kernel is compiled for
# torch CPU capabilities where the kernel beats torch's flash kernel (benchmarks/cpu_kernels.py prefill: 2.0-3.2x in
# fp32, 2.5-4.6x in bf16 on AMD Zen 5 with AVX-512). Built for AVX2 (``cpu_kernels.py prefill_avx2``: -mno-avx512f on
# the same CPU, torch at ATEN_CPU_CAPABILITY=avx2) it was 1.6x faster on a fresh 512 chunk but 0.96x (fp32) and 0.56x
# (bf16) on 1024 queries over 4k keys: its AVX2 register tiles are small (3 and 1 rows), so AVX2 keeps torch's kernel.
CAPABILITIES = ("AVX512",)


@functools.cache
def kernel_capable(capability: str | None = None) -> bool:
    """Whether this CPU (``capability``: torch's, e.g. 'AVX2') runs prefill chunks through the kernel."""
    return (capability or torch.backends.cpu.get_cpu_capability()) in CAPABILITIES


def is_prefix_causal(q_pos: torch.Tensor, k_pos: torch.Tensor) -> bool:
    """q_pos consecutive and within the keys, k_pos = 0..Tk-1 (two O(T) tensor compares, no Python loop)."""
    tq, tk = q_pos.numel(), k_pos.numel()
    if tq == 0 or tk == 0:
        return False
    q0 = int(q_pos[0])
    if q0 < 0 or q0 + tq > tk:
        return False
    return (torch.equal(q_pos, torch.arange(q0, q0 + tq, dtype=q_pos.dtype))
            and torch.equal(k_pos, torch.arange(tk, dtype=k_pos.dtype)))


def uses_prefill_kernel(q: torch.Tensor, k: torch.Tensor, q_pos: torch.Tensor, k_pos: torch.Tensor,
                        sliding_window: int | None) -> bool:
    """Whether ``attention`` sends this call to the C++ kernel."""
    # q: [Tq, Hq, D], k: [Tk, Hkv, D]
    return (sliding_window is None and kernel_capable() and q.shape[-1] in HEAD_DIMS
            and q.shape[1] % k.shape[1] == 0 and q.stride(-1) == 1 and k.stride(-1) == 1
            and cpu_ext.handles(q, k) and is_prefix_causal(q_pos, k_pos))


def prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_offset: int,
                      scale: float, bf16_dot: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [Tq, Hq, D] at positions q_offset.., k/v: [Tk, Hkv, D] at 0..Tk-1 -> out [Tq, Hq, D] (q's dtype),
    lse [Tq, Hq] fp32. ``bf16_dot``: for bf16 inputs, scores by the CPU's bf16 dot product (AVX512-BF16) where
    it has one (``has_bf16_dot()``), else widened to fp32 first."""
    if not cpu_ext.available():
        raise RuntimeError(f"the C++ CPU kernels are unavailable: {cpu_ext.load()}")
    return torch.ops.csps.prefill_attention(q, k, v, q_offset, scale, bf16_dot)


def has_bf16_dot() -> bool:
    """Whether the kernel was built with the bf16 dot-product scores (the CPU has AVX512-BF16)."""
    return cpu_ext.available() and torch.ops.csps.prefill_attention_has_bf16_dot()
