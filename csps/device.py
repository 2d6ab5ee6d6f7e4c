"""Every device-dependent choice, in one place: which device the engine runs on (``--device``),
which device each rank uses, the distributed backend, the default dtype (what the device computes
fast), how many ranks a node can hold, and which CPUs a rank's compute threads are pinned to.

bf16 is the right default only where the CPU multiplies bf16 natively (AVX-512 BF16 or AMX). On
AVX2-only CPUs torch's bf16 matmul runs at ~1 GFLOP/s against ~60 GFLOP/s in fp32 (measured on
this project's machines), so ``dtype="auto"`` picks float32 there. On CUDA it is bf16.
"""

from __future__ import annotations

import functools
import logging
import os

from csps.errors import CspsError

log = logging.getLogger("csps.device")

DEVICES = ("auto", "cpu", "cuda")


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA or without torch)."""
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(name: str) -> str:
    """'auto' -> 'cuda' where a CUDA device is available, else 'cpu'; 'cuda' without one is refused."""
    if name not in DEVICES:
        raise CspsError(f"unknown device {name!r} (choose from {', '.join(DEVICES)})")
    if name == "auto":
        return "cuda" if cuda_device_count() else "cpu"
    if name == "cuda" and not cuda_device_count():
        raise CspsError("--device cuda, but no CUDA device is available to this process "
                        "(torch.cuda.is_available() is False); use --device cpu")
    return name


def rank_device(device: str, local_rank: int):
    """The torch device of local rank ``local_rank``: cuda:LOCAL_RANK on CUDA, the CPU otherwise."""
    import torch

    return torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")


def distributed_backend(device: str, requested: str = "auto") -> str:
    """NCCL for CUDA ranks, gloo for CPU ranks (unless one is asked for)."""
    if requested != "auto":
        return requested
    return "nccl" if device == "cuda" else "gloo"


def check_ranks_per_node(device: str, num_local_ranks: int, num_gpus: int | None = None) -> None:
    """Refuse more ranks on a node than it has GPUs, before any rank starts (every CUDA rank needs its own
    GPU: NCCL refuses two ranks on one device)."""
    if device != "cuda":
        return
    gpus = cuda_device_count() if num_gpus is None else num_gpus
    if num_local_ranks > gpus:
        raise CspsError(f"{num_local_ranks} ranks on this node but only {gpus} GPU(s): each CUDA rank needs a GPU "
                        "of its own (lower --sp x --tp, or spread the ranks over nodes with torchrun)")


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
def resolve_dtype(name: str, device: str = "cpu") -> str:
    """'auto' -> 'bfloat16' on CUDA and where the CPU computes bf16 natively, else 'float32'; other names
    unchanged."""
    if name != "auto":
        return name
    if device == "cuda" or cpu_has_fast_bf16():
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


# the token budget per rank per step when none is given, by device (Sarathi-Serve's tau)
DEFAULT_TOKEN_BUDGET = {"cuda": 512, "cpu": 1024}


def default_token_budget(device: str) -> int:
    """512 on GPUs (Sarathi-Serve's strict-SLO choice: a chunk's step stays a few ms). 1024 on CPUs, where a
    512-token chunk's step already takes ~170 ms, so a step's prefill share decides the time to first token:
    against vLLM's CPU engine (``benchmarks/vs_vllm.py`` serve, SmolLM2, bf16, AMX) 1024 cut csps' mean TTFT
    from 1.78 s to 0.72 s and the run from 18.7 s to 16.1 s, for a P99 gap between tokens of 495 ms instead
    of 452 ms (vLLM's: 550-850 ms at its 4,096)."""
    return DEFAULT_TOKEN_BUDGET["cuda" if device.startswith("cuda") else "cpu"]


# share of free GPU memory the KV pool may take once the weights are in (activations need the rest)
GPU_KV_FRACTION = 0.8
CPU_KV_CAP_BYTES = 2 << 30


def kv_cache_budget_bytes(device: str, weight_bytes_per_rank: int, host_available_bytes: int) -> int:
    """Bytes of KV cache per rank when the user did not say: on CUDA a share of the GPU's free memory
    after this rank's weights; on the CPU a quarter of the available memory, at most 2 GiB."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info(torch.cuda.current_device())
        budget = int(GPU_KV_FRACTION * (free - weight_bytes_per_rank))
        if budget <= 0:
            raise CspsError(f"the weights need {weight_bytes_per_rank / 2**30:.1f} GiB per GPU but only "
                            f"{free / 2**30:.1f} GiB are free: nothing is left for the KV cache (use more --tp)")
        return budget
    return min(CPU_KV_CAP_BYTES, host_available_bytes // 4)


def gpu_profile_name() -> str:
    """The published hardware profile (``csps.perf.hardware``) closest to this process's GPU: a100, h100,
    h200 by the device's name; h100 for any other GPU (the online correction of step times absorbs the
    difference)."""
    import torch

    name = torch.cuda.get_device_name().upper()
    for key in ("H200", "H100", "A100"):
        if key in name:
            return key.lower()
    log.info("no hardware profile for %s: the cost model starts from the H100's and corrects itself from "
             "measured steps", name)
    return "h100"


def device_profile(device: str, dtype_bytes: int, link=None):
    """The cost model's view of a rank's device (``csps.perf.hardware.HardwareProfile``): a published GPU
    profile on CUDA, this CPU's probe (cached per machine and thread count) otherwise; ``link``: the SP
    link measured at start-up, when there is one."""
    from csps.perf.hardware import get_profile, load_or_probe

    if device == "cuda":
        profile = get_profile(gpu_profile_name())
        return profile if link is None else profile.with_(intra_link=link)
    import torch

    return load_or_probe(num_threads=torch.get_num_threads(), dtype_bytes=dtype_bytes, link=link)
