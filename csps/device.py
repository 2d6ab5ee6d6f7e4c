"""What this machine computes fast: the default dtype.

bf16 is the right default only where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). On
AVX2-only CPUs torch's bf16 matmul runs at ~1 GFLOP/s against ~60 GFLOP/s in fp32 (measured on
this project's machines), so ``dtype="auto"`` picks float32 there. On CUDA it is bf16.
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("csps.device")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has_fast_bf16() -> bool:
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@functools.lru_cache(maxsize=None)
def resolve_dtype(name: str) -> str:
    """'auto' -> 'bfloat16' where bf16 math is native, else 'float32'; other names unchanged."""
    if name != "auto":
        return name
    try:
        import torch

        if torch.cuda.is_available():
            return "bfloat16"
    except ImportError:
        pass
    if cpu_has_fast_bf16():
        return "bfloat16"
    log.info("dtype auto -> float32: this CPU has no native bf16 (no avx512_bf16/amx), where bf16 "
             "matmuls are ~50x slower")
    return "float32"
