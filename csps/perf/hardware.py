"""Hardware profiles for the cost model: published GPU specs and a quick probe of this machine.

Units are in the names. `peak_flops` is dense bf16 FLOP/s per device (per GPU, or per process on CPU),
link bandwidths are one direction per device. Efficiencies are achieved / peak for the kind of kernel
and are what `cost_model.fit` calibrates. No torch import at module level: only `probe_local` imports it.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import time
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Callable

from csps.errors import CspsError

log = logging.getLogger("csps.hardware")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CspsError(msg)


@dataclass(frozen=True)
class LinkProfile:
    """One direction of a device's link: NVLink, InfiniBand (one NIC per GPU) or gloo over loopback."""

    name: str
    bandwidth_bytes_per_s: float
    latency_s: float  # per message (one hop)

    def __post_init__(self) -> None:
        _check(bool(self.name), "link profile needs a name")
        _check(self.bandwidth_bytes_per_s > 0, f"link {self.name}: bandwidth must be positive")
        _check(self.latency_s >= 0, f"link {self.name}: latency must be >= 0")


@dataclass(frozen=True)
class HardwareProfile:
    name: str
    peak_flops: float  # dense bf16 FLOP/s per device
    peak_flops_fp32: float  # plain fp32 FLOP/s per device (no TF32: torch's default for matmul)
    mem_bandwidth_bytes_per_s: float
    mem_bytes: int
    intra_link: LinkProfile  # inside a node: NVLink, or loopback on CPU
    inter_link: LinkProfile  # between nodes: InfiniBand
    gpus_per_node: int
    matmul_efficiency: float  # achieved / peak for the model's GEMMs (compute-bound regime)
    attention_efficiency: float  # achieved / peak for prefill attention kernels
    mem_efficiency: float  # achieved / peak HBM (or DRAM) bandwidth when streaming weights or KV
    overlap: bool  # communication runs on its own stream/engine and can hide behind compute
    step_overhead_s: float  # fixed per engine step: scheduling, launch, sampling, sync
    seq_overhead_s: float = 0.0  # per sequence in the step (metadata, sampling, output handling)
    gemm_tile_tokens: int = 1  # GEMM rows are padded to a multiple of this (tile quantization)

    def __post_init__(self) -> None:
        _check(bool(self.name), "hardware profile needs a name")
        for f in ("peak_flops", "peak_flops_fp32", "mem_bandwidth_bytes_per_s", "mem_bytes", "gpus_per_node"):
            _check(getattr(self, f) > 0, f"hardware profile {self.name}: {f} must be positive")
        for f in ("matmul_efficiency", "attention_efficiency", "mem_efficiency"):
            v = getattr(self, f)
            _check(0 < v <= 1, f"hardware profile {self.name}: {f} must be in (0, 1], got {v}")
        _check(self.gemm_tile_tokens >= 1, f"hardware profile {self.name}: gemm_tile_tokens must be >= 1")
        _check(self.step_overhead_s >= 0 and self.seq_overhead_s >= 0,
               f"hardware profile {self.name}: overheads must be >= 0")
        _check(isinstance(self.intra_link, LinkProfile) and isinstance(self.inter_link, LinkProfile),
               f"hardware profile {self.name}: links must be LinkProfile")

    def peak_flops_for(self, dtype_bytes: int) -> float:
        """Peak FLOP/s for an element size: 2 (bf16) or 4 (fp32)."""
        _check(dtype_bytes in (2, 4), f"dtype_bytes must be 2 (bf16) or 4 (fp32), got {dtype_bytes}")
        return self.peak_flops if dtype_bytes == 2 else self.peak_flops_fp32

    def link_for(self, num_devices: int) -> LinkProfile:
        """The slowest link a group of `num_devices` consecutive devices uses."""
        return self.intra_link if num_devices <= self.gpus_per_node else self.inter_link

    def with_(self, **kw) -> HardwareProfile:
        return replace(self, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> HardwareProfile:
        d = dict(d)
        d["intra_link"] = LinkProfile(**d["intra_link"])
        d["inter_link"] = LinkProfile(**d["inter_link"])
        return HardwareProfile(**d)


# --- Published GPU profiles -------------------------------------------------------------------------
# Efficiency factors (ours, from published kernel measurements):
# - matmul: cuBLAS reaches ~80-90% of peak on large square bf16 GEMMs, but whole-model linear layers
#   (odd shapes, norms, activations in between) run at ~60-75% (Meta CP: 502 TF/s/GPU end to end on
#   H100; Medha: 50-60% MFU). A100 0.75, H100/H200 0.7 (H100 is harder to saturate).
# - attention: FlashAttention-2 forward reaches up to ~73% of A100 peak (Dao 2023, arXiv 2307.08691);
#   FlashAttention-3 up to ~75% of H100 bf16 peak (Shah et al. 2024, arXiv 2407.08608). Causal masking
#   and head_dim 128 at moderate lengths land lower: 0.6 for all three.
# - memory: streaming reads reach ~85% of HBM peak (decode kernels; Medha reports MBU up to 92%).
# - step overhead: ~1 ms of CPU-side scheduling, sampling and synchronisation per iteration (vLLM-class
#   engines; kernel launches hide behind the GPU when it is busy). Not a datasheet number.
# - link latency per message: ~2 us over NVLink, ~8 us over IB (order of small-message nccl-tests
#   latencies, not datasheet numbers). With them the model gives Meta's 46 ms TP8 decode of 405B at 128K.
# - GEMM tile: 128 rows. Sarathi-Serve measured a 257-token chunk 32% slower than 256 (tile
#   quantization), so token counts are rounded up to multiples of 128 for the linear layers.

# NVLink3: 12 links x 50 GB/s = 600 GB/s bidirectional per A100 -> 300 GB/s each way (A100 datasheet,
#   nvidia.com/content/dam/en-zz/Solutions/Data-Center/a100/pdf/
#   nvidia-a100-datasheet-us-nvidia-1758950-r4-web.pdf).
_NVLINK3 = LinkProfile("nvlink3", 300e9, 2e-6)
# NVLink4: 900 GB/s bidirectional per H100/H200 -> 450 GB/s each way (H100 datasheet,
#   nvidia.com/en-us/data-center/h100/; H200 product page nvidia.com/en-us/data-center/h200/).
_NVLINK4 = LinkProfile("nvlink4", 450e9, 2e-6)
# DGX A100: one ConnectX-6 HDR 200 Gb/s NIC per GPU = 25 GB/s (DGX A100 user guide / datasheet).
_IB_HDR = LinkProfile("ib-hdr-200g", 200e9 / 8, 8e-6)
# DGX H100/H200: one ConnectX-7 NDR 400 Gb/s NIC per GPU = 50 GB/s (DGX H100/H200 datasheets).
_IB_NDR = LinkProfile("ib-ndr-400g", 400e9 / 8, 8e-6)

_GB = 10**9


def _gpu_profiles() -> dict[str, HardwareProfile]:
    return {
        # A100-80GB SXM4 (A100 datasheet): bf16 tensor 312 TFLOP/s dense (624 with sparsity), fp32 19.5
        # TFLOP/s, HBM2e 2,039 GB/s, 80 GB.
        "a100": HardwareProfile(
            name="a100", peak_flops=312e12, peak_flops_fp32=19.5e12, mem_bandwidth_bytes_per_s=2.039e12,
            mem_bytes=80 * _GB, intra_link=_NVLINK3, inter_link=_IB_HDR, gpus_per_node=8,
            matmul_efficiency=0.75, attention_efficiency=0.6, mem_efficiency=0.85, overlap=True,
            step_overhead_s=1e-3, gemm_tile_tokens=128),
        # H100 SXM5 (H100 datasheet): bf16 tensor 1,979 TFLOP/s with sparsity -> 989 dense, fp32 67 TFLOP/s,
        # HBM3 3.35 TB/s, 80 GB.
        "h100": HardwareProfile(
            name="h100", peak_flops=989e12, peak_flops_fp32=67e12, mem_bandwidth_bytes_per_s=3.35e12,
            mem_bytes=80 * _GB, intra_link=_NVLINK4, inter_link=_IB_NDR, gpus_per_node=8,
            matmul_efficiency=0.7, attention_efficiency=0.6, mem_efficiency=0.85, overlap=True,
            step_overhead_s=1e-3, gemm_tile_tokens=128),
        # H200 SXM (H200 product page): same compute as H100 (989 TFLOP/s dense bf16, 67 fp32), HBM3e
        # 4.8 TB/s, 141 GB.
        "h200": HardwareProfile(
            name="h200", peak_flops=989e12, peak_flops_fp32=67e12, mem_bandwidth_bytes_per_s=4.8e12,
            mem_bytes=141 * _GB, intra_link=_NVLINK4, inter_link=_IB_NDR, gpus_per_node=8,
            matmul_efficiency=0.7, attention_efficiency=0.6, mem_efficiency=0.85, overlap=True,
            step_overhead_s=1e-3, gemm_tile_tokens=128),
    }


PROFILE_NAMES = ("a100", "h100", "h200", "local")


def get_profile(name: str) -> HardwareProfile:
    """A published GPU profile by name, or `local` (this machine, probed for bf16 once and cached;
    use load_or_probe(dtype_bytes=4) for fp32)."""
    key = name.strip().lower()
    if key == "local":
        return load_or_probe()
    profiles = _gpu_profiles()
    if key not in profiles:
        raise CspsError(f"unknown hardware profile {name!r} (choose from {', '.join(PROFILE_NAMES)})")
    return profiles[key]


# --- This machine ------------------------------------------------------------------------------------

# gloo over loopback on the development machines (docs/platform.md): ~2 GB/s each way when both ranks
# send at once, 64-byte round trip ~110 us. Used until the parallel package measures the real link.
LOOPBACK_GLOO = LinkProfile("loopback-gloo-assumed", 2e9, 55e-6)


def _best_seconds(fn: Callable[[], object], reps: int, budget_s: float) -> float:
    fn()  # warm-up (allocations, oneDNN kernel selection)
    best = float("inf")
    start = time.perf_counter()
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
        if i >= 1 and time.perf_counter() - start > budget_s:
            break
    return best


def _gemm_flops(torch, dtype, max_size: int, rep_budget_s: float = 0.1) -> float:
    """Best GEMM FLOP/s, growing n from 256 to max_size while one product stays under rep_budget_s.

    Adaptive because bf16 GEMM is ~850 GFLOP/s with avx512_bf16 but ~1 GFLOP/s on AVX2-only CPUs.
    """
    n = 256
    while True:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        out = torch.empty(n, n, dtype=dtype)
        secs = _best_seconds(lambda: torch.mm(a, b, out=out), 3, 3 * rep_budget_s)
        if 2 * n > max_size or 8 * secs > rep_budget_s:
            return 2.0 * n**3 / secs
        n *= 2


def probe_local(num_threads: int | None = None, dtype_bytes: int = 2, link: LinkProfile | None = None,
                measure_link: Callable[[], LinkProfile] | None = None, max_size: int = 2048) -> HardwareProfile:
    """Measure this machine in ~1-3 s: bf16 and fp32 GEMM FLOP/s, causal attention FLOP/s in the dtype
    of `dtype_bytes`, memory copy bandwidth.

    Each number is the best of a few repetitions. "Peak" for the probed dtype is the best of GEMM and
    attention throughput, so both efficiencies are <= 1 (a CPU has no datasheet peak; bf16 attention can
    beat a bf16 GEMM on CPUs without avx512_bf16). The link is `link`, else `measure_link()` (e.g. a gloo
    ping-pong from the parallel package), else LOOPBACK_GLOO. Run it with the thread count each rank
    will use (cores // ranks when ranks share the machine).
    """
    _check(dtype_bytes in (2, 4), f"dtype_bytes must be 2 (bf16) or 4 (fp32), got {dtype_bytes}")
    import torch  # lazy: the cost model and scheduler must not need torch

    old_threads = torch.get_num_threads()
    if num_threads is not None:
        _check(num_threads >= 1, "num_threads must be >= 1")
        torch.set_num_threads(num_threads)
    try:
        with torch.inference_mode():
            gemm = {2: _gemm_flops(torch, torch.bfloat16, max_size), 4: _gemm_flops(torch, torch.float32, max_size)}
            # causal attention, 1024 tokens x 8 heads x 64 (counted as 4*T*(T/2)*H*D, as the cost model does)
            t, h, d = 1024, 8, 64
            dtype = torch.bfloat16 if dtype_bytes == 2 else torch.float32
            q, k, v = (torch.randn(1, h, t, d, dtype=dtype) for _ in range(3))
            attn_s = _best_seconds(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True), 3, 0.5)
            attn_flops = 4.0 * t * (t / 2) * h * d / attn_s
            # memory: copy 128 MiB (read + write = 2 x bytes moved)
            src = torch.ones(32 * 2**20, dtype=torch.float32)
            dst = torch.empty_like(src)
            copy_s = _best_seconds(lambda: dst.copy_(src), 5, 0.5)
            mem_bw = 2.0 * src.numel() * src.element_size() / copy_s
    finally:
        torch.set_num_threads(old_threads)
    if link is None:
        link = measure_link() if measure_link is not None else LOOPBACK_GLOO
    peak = max(gemm[dtype_bytes], attn_flops)
    peaks = dict(gemm)
    peaks[dtype_bytes] = peak
    return HardwareProfile(
        name=f"local-{socket.gethostname()}-{'bf16' if dtype_bytes == 2 else 'fp32'}",
        peak_flops=peaks[2], peak_flops_fp32=peaks[4],
        mem_bandwidth_bytes_per_s=mem_bw, mem_bytes=_mem_total_bytes() or 1, intra_link=link, inter_link=link,
        gpus_per_node=os.cpu_count() or 1,
        # starting points for cost_model.fit (the model's GEMMs are smaller than the probe's)
        matmul_efficiency=gemm[dtype_bytes] / peak, attention_efficiency=attn_flops / peak,
        mem_efficiency=0.9,
        overlap=False,  # isend/irecv are CPU work on the same cores (docs/platform.md)
        step_overhead_s=5e-3, seq_overhead_s=2e-4)


def _torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def cache_key(num_threads: int | None = None, dtype_bytes: int = 2) -> str:
    threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
    return f"{socket.gethostname()}|torch-{_torch_version()}|threads-{threads}|dtype-{dtype_bytes}"


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "csps" / "probe.json"


def _read_cache(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def save_cached(profile: HardwareProfile, key: str, path: Path | None = None) -> None:
    """Store a (probed or fitted) profile under `key` in the JSON cache, atomically."""
    path = Path(path) if path is not None else default_cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _read_cache(path)
    data[key] = profile.to_dict()
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _machine_busy() -> bool:
    try:
        return os.getloadavg()[0] > (os.cpu_count() or 1)
    except OSError:
        return False


def load_or_probe(num_threads: int | None = None, dtype_bytes: int = 2, path: Path | None = None,
                  refresh: bool = False, link: LinkProfile | None = None) -> HardwareProfile:
    """This machine's profile from the JSON cache (keyed by hostname, torch version, threads, dtype),
    probing and storing it on a miss.

    `link` overrides the cached link numbers (e.g. freshly measured gloo bandwidth) without re-probing.
    """
    path = Path(path) if path is not None else default_cache_path()
    key = cache_key(num_threads, dtype_bytes)
    profile = None
    if not refresh and key in (data := _read_cache(path)):
        try:
            profile = HardwareProfile.from_dict(data[key])
        except (TypeError, KeyError, CspsError):
            profile = None  # stale format: probe again
    if profile is None:
        busy_before = _machine_busy()
        profile = probe_local(num_threads=num_threads, dtype_bytes=dtype_bytes)
        if not (busy_before or _machine_busy()):  # a probe taken under load would be wrong forever
            save_cached(profile, key, path)
        else:
            log.warning("the machine is busy (load average above its %d cores): using this probe "
                        "without caching it", os.cpu_count() or 1)
    if link is not None:
        profile = profile.with_(intra_link=link, inter_link=link)
    return profile


def _mem_total_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def machine_info() -> dict:
    """Facts about this machine for benchmark JSON (no torch import)."""
    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu_model in ("unknown", "", platform.machine()):
                    cpu_model = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 1
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "usable_cores": usable,
        "cpu_flags": sorted(flags & {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "fma"}),
        "mem_total_bytes": _mem_total_bytes(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _torch_version(),
    }
