"""Device-dependent choices: the default dtype (what this machine computes fast) and which CPUs a
rank's compute threads are pinned to.

bf16 is the right default only where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). On
AVX2-only CPUs torch's bf16 matmul runs at ~1 GFLOP/s against ~60 GFLOP/s in fp32 (measured on
this project's machines), so ``dtype="auto"`` picks float32 there. On CUDA it is bf16.
"""

from __future__ import annotations

import functools
import logging
import os

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


def cpu_binding(local_rank: int, num_local_ranks: int, num_threads: int) -> list[int] | None:
    """The CPUs the compute threads of local rank ``local_rank`` of ``num_local_ranks`` are pinned to,
    one thread each: the rank's slice of the CPUs this process may run on. None where pinning is off
    (``CSPS_CPU_BIND=off``) or the CPUs are too few for every local rank's threads (nothing to gain
    from pinning oversubscribed threads). vLLM's CPU backend pins its threads the same way: a thread
    that stays on its core keeps its caches and is not parked behind another process's thread."""
    if os.environ.get("CSPS_CPU_BIND", "auto").lower() == "off":
        return None
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < num_local_ranks * num_threads:
        return None
    return cpus[local_rank * num_threads : (local_rank + 1) * num_threads]
