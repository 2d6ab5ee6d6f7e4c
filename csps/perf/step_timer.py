"""Predicted step times for the scheduler's time budget (Medha's adaptive chunking), pure Python.

``StepTimer(prefills, decodes)`` is the cost model (``cost_model.predict_step``) on a hardware
profile — this machine's probe in the engine, a published GPU profile in the simulator — with its
attention time and the rest of the step each scaled by a correction learnt online: after each step
the engine reports the measured time, and the two corrections are the least-squares fit of the
recent steps (forgetting older ones), held towards the smoothed ratio of measured to predicted time
where the steps cannot tell the two terms apart. One factor would cancel out of the time budget's
comparison (a chunk over a long cache against a fresh one); two let the budget learn that this
machine's attention over a long cache costs less, relative to its GEMMs, than the profile says (on
a CPU, torch's flash attention runs 2.5x faster per FLOP over a 4k cache than over a fresh
512-token chunk). The scheduler only calls it; it never imports torch.
"""

from __future__ import annotations

from csps.config import ModelConfig
from csps.perf.cost_model import StepShape, predict_step
from csps.perf.hardware import HardwareProfile

Prefills = tuple[tuple[int, int, int], ...]  # (new tokens, cached tokens, sp degree)
Decodes = tuple[tuple[int, int], ...]  # (context length with the new token, sp degree)

CORRECTION_RANGE = (0.1, 10.0)
MEMORY_STEPS = 30  # the fit forgets a step's weight by 1/MEMORY_STEPS per later step
RIDGE = 0.05  # pull of each term towards the single ratio, relative to the term's own weight in the fit


class StepTimer:
    def __init__(self, model: ModelConfig, hw: HardwareProfile, dtype_bytes: int, *, num_sp_ranks: int = 1,
                 tp: int = 1, exchange: str = "auto", smoothing: float = 0.2) -> None:
        self.model, self.hw, self.dtype_bytes = model, hw, dtype_bytes
        self.num_sp_ranks, self.tp, self.exchange = num_sp_ranks, tp, exchange
        self.smoothing = smoothing
        self.correction = 1.0  # measured / predicted, smoothed: the anchor of the two-term fit
        self.attn_correction = self.rest_correction = 1.0
        self._sums = [0.0] * 5  # weighted sums of a·a, a·r, r·r, a·y, r·y (a attention, r the rest, y measured)
        self.num_observed = 0

    def parts_s(self, prefills: Prefills, decodes: Decodes) -> tuple[float, float]:
        """The cost model's prediction, uncorrected: (attention, the rest of the step)."""
        if not prefills and not decodes:
            return 0.0, 0.0
        shape = StepShape(prefills=prefills, decodes=decodes, exchange=self.exchange, tp=self.tp,
                          num_sp_ranks=self.num_sp_ranks)
        cost = predict_step(shape, self.model, self.hw, self.dtype_bytes)
        return cost.attention_s, cost.total_s - cost.attention_s

    def raw_s(self, prefills: Prefills, decodes: Decodes) -> float:
        """The cost model's prediction, uncorrected."""
        return sum(self.parts_s(prefills, decodes))

    def __call__(self, prefills: Prefills, decodes: Decodes) -> float:
        attn, rest = self.parts_s(prefills, decodes)
        return attn * self.attn_correction + rest * self.rest_correction

    def observe(self, prefills: Prefills, decodes: Decodes, measured_s: float) -> None:
        """Fold one measured step into the correction; only steps with a prefill chunk count (those are
        the steps the budget sizes; decode-only steps would pull the correction towards their own error)."""
        attn, rest = self.parts_s(prefills, decodes)
        raw = attn + rest
        if not prefills or raw <= 0 or measured_s <= 0:
            return
        lo, hi = CORRECTION_RANGE
        ratio = min(max(measured_s / raw, lo), hi)
        a = 1.0 if self.num_observed == 0 else self.smoothing
        self.correction = (1 - a) * self.correction + a * ratio
        self.num_observed += 1
        keep = 1 - 1 / MEMORY_STEPS
        new = (attn * attn, attn * rest, rest * rest, attn * measured_s, rest * measured_s)
        self._sums = [keep * old + x for old, x in zip(self._sums, new)]
        self.attn_correction, self.rest_correction = self._fit()

    def _fit(self) -> tuple[float, float]:
        """Least squares of measured ~ c_attn·attention + c_rest·rest over the remembered steps, each term held
        towards the single ratio by RIDGE of its own weight (steps of one shape fit c_attn = c_rest = ratio)."""
        s_aa, s_ar, s_rr, s_ay, s_ry = self._sums
        mu_a, mu_r, c0 = RIDGE * s_aa, RIDGE * s_rr, self.correction
        m11, m22 = s_aa + mu_a, s_rr + mu_r
        det = m11 * m22 - s_ar * s_ar
        if det <= 1e-30 * max(m11 * m22, 1e-300):
            return c0, c0
        b1, b2 = s_ay + mu_a * c0, s_ry + mu_r * c0
        lo, hi = CORRECTION_RANGE
        c_attn = (b1 * m22 - s_ar * b2) / det if s_aa > 0 else c0
        c_rest = (m11 * b2 - s_ar * b1) / det if s_rr > 0 else c0
        return min(max(c_attn, lo), hi), min(max(c_rest, lo), hi)
