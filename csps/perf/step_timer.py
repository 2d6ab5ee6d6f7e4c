"""Predicted step times for the scheduler's time budget (Medha's adaptive chunking), pure Python.

``StepTimer(prefills, decodes)`` is the cost model (``cost_model.predict_step``) on a hardware
profile — this machine's probe in the engine, a published GPU profile in the simulator — times a
correction learnt online: after each step the engine reports the measured time, and the ratio of
measured to predicted time is smoothed into the correction, so a profile that is off by a constant
factor stops mattering within a few steps. The scheduler only calls it; it never imports torch.
"""

from __future__ import annotations

from csps.config import ModelConfig
from csps.perf.cost_model import StepShape, predict_step
from csps.perf.hardware import HardwareProfile

Prefills = tuple[tuple[int, int, int], ...]  # (new tokens, cached tokens, sp degree)
Decodes = tuple[tuple[int, int], ...]  # (context length with the new token, sp degree)

CORRECTION_RANGE = (0.1, 10.0)


class StepTimer:
    def __init__(self, model: ModelConfig, hw: HardwareProfile, dtype_bytes: int, *, num_sp_ranks: int = 1,
                 tp: int = 1, exchange: str = "auto", smoothing: float = 0.2) -> None:
        self.model, self.hw, self.dtype_bytes = model, hw, dtype_bytes
        self.num_sp_ranks, self.tp, self.exchange = num_sp_ranks, tp, exchange
        self.smoothing = smoothing
        self.correction = 1.0  # measured / predicted, smoothed
        self.num_observed = 0

    def raw_s(self, prefills: Prefills, decodes: Decodes) -> float:
        """The cost model's prediction, uncorrected."""
        if not prefills and not decodes:
            return 0.0
        shape = StepShape(prefills=prefills, decodes=decodes, exchange=self.exchange, tp=self.tp,
                          num_sp_ranks=self.num_sp_ranks)
        return predict_step(shape, self.model, self.hw, self.dtype_bytes).total_s

    def __call__(self, prefills: Prefills, decodes: Decodes) -> float:
        return self.raw_s(prefills, decodes) * self.correction

    def observe(self, prefills: Prefills, decodes: Decodes, measured_s: float) -> None:
        """Fold one measured step into the correction; only steps with a prefill chunk count (those are
        the steps the budget sizes; decode-only steps would pull the correction towards their own error)."""
        raw = self.raw_s(prefills, decodes)
        if not prefills or raw <= 0 or measured_s <= 0:
            return
        lo, hi = CORRECTION_RANGE
        ratio = min(max(measured_s / raw, lo), hi)
        a = 1.0 if self.num_observed == 0 else self.smoothing
        self.correction = (1 - a) * self.correction + a * ratio
        self.num_observed += 1
