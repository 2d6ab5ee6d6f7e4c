"""Choosing pass-Q or pass-KV for a sequence-parallel prefill chunk, calibrated on this machine.

Meta's Algorithm 1 (background.md §6): pass-KV when the chunk is large enough for the ring to hide
(T >= s·C·g·e / (2·BW)) or when the new tokens are a large share of the context
(T/(T+P) >= 2·n_kv/n_q); otherwise pass-Q. C (attention FLOP/s) and BW (link bytes/s) come from a
start-up calibration: the cached compute probe of this machine (``hardware.load_or_probe``) and a
gloo ping over the actual SP group — never constants.
"""

from __future__ import annotations

import logging
import time

import torch

from csps.config import ModelConfig
from csps.parallel.comm import Comm
from csps.perf.cost_model import choose_exchange
from csps.perf.hardware import HardwareProfile, LinkProfile

log = logging.getLogger("csps.exchange")


def measure_link(comm: Comm, num_bytes: int = 4 << 20, reps: int = 3) -> LinkProfile:
    """Ring-exchange bandwidth and small-message latency over ``comm`` (collective on every rank)."""
    big = torch.zeros(num_bytes // 4, dtype=torch.float32, device=comm.device)
    small = torch.zeros(16, dtype=torch.float32, device=comm.device)
    comm.ring_send_recv([small], [(small.shape, small.dtype)], "calibrate").wait()  # warm up
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.ring_send_recv([small], [(small.shape, small.dtype)], "calibrate").wait()
    latency_s = (time.perf_counter() - t0) / reps
    t0 = time.perf_counter()
    for _ in range(reps):
        comm.ring_send_recv([big], [(big.shape, big.dtype)], "calibrate").wait()
    seconds = max((time.perf_counter() - t0) / reps - latency_s, 1e-9)
    comm.reset_step()
    return LinkProfile(name="gloo-measured", bandwidth_bytes_per_s=num_bytes / seconds, latency_s=latency_s)


class ExchangePolicy:
    """Rank 0's per-chunk decision, from calibrated compute and link numbers."""

    def __init__(self, model: ModelConfig, dtype_bytes: int, sp: int, tp: int, profile: HardwareProfile,
                 forced: str | None = None) -> None:
        self.model, self.dtype_bytes, self.sp, self.tp = model, dtype_bytes, sp, tp
        self.profile = profile
        self.forced = forced  # "ulysses", or a fixed exchange for experiments

    @staticmethod
    def calibrate(model: ModelConfig, dtype_bytes: int, sp: int, tp: int, profile: HardwareProfile,
                  forced: str | None = None) -> ExchangePolicy:
        """``profile``: the device's compute numbers with the SP link measured at start-up."""
        policy = ExchangePolicy(model, dtype_bytes, sp, tp, profile, forced)
        link = profile.link_for(sp * tp)
        log.info("SP exchange calibrated: attention %.1f GFLOP/s, link %.2f GB/s, latency %.0f us; "
                 "pass-KV hides for chunks >= %d tokens per step", profile.peak_flops_for(dtype_bytes)
                 * profile.attention_efficiency / 1e9, link.bandwidth_bytes_per_s / 1e9, link.latency_s * 1e6,
                 policy.hidden_threshold_tokens())
        return policy

    def hidden_threshold_tokens(self) -> int:
        g = self.model.num_kv_heads / self.model.num_heads
        flops = self.profile.peak_flops_for(self.dtype_bytes) * self.profile.attention_efficiency
        bw = self.profile.link_for(self.sp * self.tp).bandwidth_bytes_per_s
        return int(self.sp * flops * g * self.dtype_bytes / (2 * bw))

    def choose(self, num_new: int, num_cached: int) -> str:
        if self.forced:
            return self.forced
        return choose_exchange(num_new, num_cached, self.sp, self.model, self.profile, self.dtype_bytes, self.tp)
