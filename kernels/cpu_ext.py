"""csps's C++ CPU kernels (``kernels/csrc``): built once per machine, loaded as ``torch.ops.csps``.

The sources compile against the installed torch with ``torch.utils.cpp_extension`` (g++ and ninja;
about 25 s of CPU) for this CPU (``-march=native``): ``make install`` builds them
(``python -m csps.kernels.cpu_ext``), and a process that finds no build for its machine builds
one at first use. Builds live under ``$CSPS_KERNEL_CACHE``, else ``<sys.prefix>/var/csps-kernels``
(the virtual environment), else ``~/.cache/csps/kernels``, one folder per (sources, torch,
Python, CPU flags), so a checkout that moves to another CPU kind builds again instead of loading
code its CPU cannot run. Concurrent builders (the ranks of one engine) wait on torch's lock.

Where no compiler is available the build fails once, is logged once, and every caller uses the
plain-torch twin of each kernel (``available()`` is False); nothing else changes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import sys
import time

import torch

log = logging.getLogger("csps.kernels")

SOURCES = ("paged_decode.cpp", "pointwise.cpp", "prefill_attention.cpp", "small_gemm.cpp", "threads.cpp")
HEADERS = ("vec.h",)  # included by the sources: part of the build key
CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=fast", "-fno-trapping-math")  # no FP traps: float->int casts vectorize


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


@functools.cache
def cpu_vendor() -> str:
    """'AMD', 'Intel' or '' (unknown): MKL's and oneDNN's small-matrix paths differ by vendor, so some of the
    kernels' dispatch thresholds do too (``kernels/linear.py``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    v = line.split(":", 1)[1].strip()
                    return {"AuthenticAMD": "AMD", "GenuineIntel": "Intel"}.get(v, "")
    except OSError:
        pass
    return ""


def build_key() -> str:
    """What a build depends on: the sources, the flags, torch, Python and this CPU's features."""
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        with open(os.path.join(CSRC, name), "rb") as f:
            h.update(f.read())
    h.update(" ".join(CFLAGS).encode())
    h.update(torch.__version__.encode())
    h.update(sys.version.encode())
    h.update(_cpu_flags().encode())
    return h.hexdigest()[:16]


def _writable(d: str) -> bool:
    try:
        os.makedirs(d, exist_ok=True)
        return os.access(d, os.W_OK)
    except OSError:
        return False


def build_dir() -> str:
    key = build_key()
    roots = [os.environ.get("CSPS_KERNEL_CACHE"), os.path.join(sys.prefix, "var", "csps-kernels"),
             os.path.join(os.path.expanduser("~"), ".cache", "csps", "kernels")]
    for root in roots:
        if root and _writable(os.path.join(root, key)):
            return os.path.join(root, key)
    raise OSError(f"no writable folder for the CPU kernels among {[r for r in roots if r]}")


@functools.cache
def load() -> str | None:
    """Builds (if needed) and loads the kernels; returns None on success, else why they are unavailable
    (logged once)."""
    from torch.utils import cpp_extension

    t0 = time.perf_counter()
    try:
        d = build_dir()
        fresh = not any(f.endswith(".so") for f in os.listdir(d))
        if fresh:
            log.info("building the C++ CPU kernels in %s (once per machine, ~30 s)", d)
        cpp_extension.load(name="csps_cpu_kernels", sources=[os.path.join(CSRC, s) for s in SOURCES],
                           extra_cflags=list(CFLAGS), extra_ldflags=["-fopenmp"], build_directory=d,
                           is_python_module=False, verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a failed build: fall back, say why
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
        log.warning("C++ CPU kernels unavailable (%s): using the plain torch paths, which are slower", reason)
        return reason
    if fresh:
        log.info("built the C++ CPU kernels in %.1f s", time.perf_counter() - t0)
    return None


def available() -> bool:
    return load() is None


def handles(*tensors: torch.Tensor) -> bool:
    """Whether the C++ kernels take these tensors: on the CPU, all float32 or all bfloat16, kernels built."""
    t0 = tensors[0]
    return (t0.device.type == "cpu" and t0.dtype in (torch.float32, torch.bfloat16)
            and all(t.dtype == t0.dtype and t.device.type == "cpu" for t in tensors) and available())


def bind_threads(cpus: list[int]) -> bool:
    """Pin torch's OpenMP threads to ``cpus``, thread i to cpus[i % len]; False without the kernels."""
    if not available():
        return False
    torch.ops.csps.bind_threads(list(cpus))
    return True


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = load()
    if reason is not None:
        print(f"csps: the C++ CPU kernels did not build ({reason}); csps will use its plain torch paths",
              file=sys.stderr)
        return 1
    print(f"csps: C++ CPU kernels ready in {build_dir()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
