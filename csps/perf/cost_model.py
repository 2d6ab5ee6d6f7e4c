"""Predicts the wall time of one engine step from its shape (roofline + communication), pure Python.

Used by the scheduler (time budgets, adaptive chunk sizes), by `csps bench --simulate` and, after
`fit`, by `csps bench --validate`. Formulas (docs/background.md; per layer, per device, e = dtype bytes,
s = SP degree of an item, t = TP degree, heads per device hq = Hq/t, hkv = max(1, Hkv/t)):

- linear: FLOPs 2 * P_layers/t * tokens + 2 * V*d/t per logits row, tokens rounded up to the GEMM tile;
  time = max(FLOPs / (F * eff_mm), weight bytes / (BW_mem * eff_mem)) (roofline: small batches read
  the weights and are memory-bound).
- prefill attention, T new tokens over C cached, split evenly over s ranks (zigzag):
  FLOPs 4 * T * (C + T/2) * hq * D / s; time = max(FLOPs / (F * eff_attn), KV bytes / BW_mem).
- decode attention (pass-Q, context c over s ranks): FLOPs 4 * c/s * hq * D, KV read c/s * 2*hkv*D*e;
  memory-bound in practice.
- pass-KV ring: s-1 steps, each sends ((T + C)/s) * 2*hkv*D*e  (= (s-1)/s * 2gNd*e in total);
  pass-Q ring: s-1 steps of (T/s) * hq*D*e, then an all-to-all of partial outputs and LSEs back to the
  owners, (s-1)/s * T * hq * (D*e + 4), always exposed.
  Ring time per layer = (s-1) * max(c, m) + c with overlap, s*c + (s-1)*m without (c = attention time
  per ring step, m = message time + link latency).
- Ulysses: all-to-alls of Q, K, V and the output, (s-1)/s * (T/s) * (2*hq + 2*hkv) * D * e per device
  ((2 + 2g) * N*d/P * e), exposed; the cache is head-sharded, so cached KV does not move.
- TP: 2 all-reduces of tokens*d*e per layer, each sending 2(t-1)/t of it per device (ring) with a
  2*ceil(log2 t) latency term (tree, as NCCL does for small messages), on the critical path.
- decode pass-Q: the owner sends Q (hq*D*e) to s-1 ranks, each returns (out, LSE); batched into one
  exchange per layer for all decodes (2 * (S-1) latencies per layer), exposed.
- overhead: step_overhead_s + seq_overhead_s per sequence.

Placement: items go greedily to the least-loaded SP ranks (what a balancing scheduler does), decode
owners are the least-loaded of their ranks, and the step takes as long as the busiest rank.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field, replace

from csps.config import ModelConfig
from csps.errors import CspsError
from csps.perf.hardware import HardwareProfile

EXCHANGES = ("pass_kv", "pass_q", "ulysses", "auto")
LSE_BYTES = 4  # the log-sum-exp travels in fp32
FIT_PARAMS = ("matmul_efficiency", "attention_efficiency", "mem_efficiency", "step_overhead_s", "seq_overhead_s")
_EFFICIENCIES = ("matmul_efficiency", "attention_efficiency", "mem_efficiency")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CspsError(msg)


@dataclass(frozen=True)
class StepShape:
    """One engine step. prefills: (num_new_tokens, num_cached_tokens, sp_degree); decodes:
    (context_len including the new token, sp_degree). num_sp_ranks 0 means the largest sp_degree."""

    prefills: tuple[tuple[int, int, int], ...] = ()
    decodes: tuple[tuple[int, int], ...] = ()
    exchange: str = "pass_kv"  # for SP prefill chunks: pass_kv | pass_q | ulysses | auto (Meta's rule)
    tp: int = 1
    num_sp_ranks: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prefills", tuple(tuple(int(x) for x in p) for p in self.prefills))
        object.__setattr__(self, "decodes", tuple(tuple(int(x) for x in d) for d in self.decodes))
        for p in self.prefills:
            _check(len(p) == 3 and p[0] >= 1 and p[1] >= 0 and p[2] >= 1,
                   f"prefill chunk must be (num_new >= 1, num_cached >= 0, sp_degree >= 1), got {p}")
        for d in self.decodes:
            _check(len(d) == 2 and d[0] >= 1 and d[1] >= 1,
                   f"decode must be (context_len >= 1, sp_degree >= 1), got {d}")
        _check(self.exchange in EXCHANGES, f"unknown exchange {self.exchange!r} ({' | '.join(EXCHANGES)})")
        _check(self.tp >= 1 and self.num_sp_ranks >= 0, "tp must be >= 1 and num_sp_ranks >= 0")
        _check(self.num_sp_ranks == 0 or self.num_sp_ranks >= self.max_degree,
               f"num_sp_ranks ({self.num_sp_ranks}) is smaller than an item's sp_degree ({self.max_degree})")

    @property
    def max_degree(self) -> int:
        return max([p[2] for p in self.prefills] + [d[1] for d in self.decodes] + [1])

    @property
    def sp_ranks(self) -> int:
        return self.num_sp_ranks or self.max_degree

    @property
    def num_seqs(self) -> int:
        return len(self.prefills) + len(self.decodes)

    @property
    def num_tokens(self) -> int:
        return sum(p[0] for p in self.prefills) + len(self.decodes)


@dataclass(frozen=True)
class StepCost:
    """Predicted step time; the breakdown is the busiest SP rank's (total = overhead + linear +
    attention + exposed_comm). bytes_by_kind and flops are summed over all devices and layers."""

    total_s: float
    linear_s: float
    attention_s: float
    comm_s: float  # all communication time of the busiest rank, hidden or not
    exposed_comm_s: float  # the part on the critical path
    overhead_s: float
    # kinds as parallel/ counts them: pass_kv | pass_q | pass_q_out | ulysses_a2a | tp_allreduce
    bytes_by_kind: dict[str, float] = field(default_factory=dict)
    flops: float = 0.0
    num_devices: int = 1


class _Rank:
    """Work accumulated on one SP rank (a TP group of `tp` devices) during a step."""

    __slots__ = ("load", "tokens", "logit_rows", "attn_s", "comm_s", "exposed_s", "dec_flops", "dec_bytes", "dec_sp")

    def __init__(self) -> None:
        self.load = self.tokens = self.attn_s = self.comm_s = self.exposed_s = self.dec_flops = self.dec_bytes = 0.0
        self.logit_rows, self.dec_sp = 0, False


@dataclass(frozen=True)
class _Dims:
    """Per-device sizes for a model under TP degree t and element size e."""

    layers: int
    d: int
    head_dim: int
    hq: float
    hkv: float
    layer_params: float  # weights of all decoder layers on one device
    head_params: float  # LM head on one device (vocab-parallel)
    e: int

    @staticmethod
    def of(model: ModelConfig, tp: int, e: int) -> _Dims:
        emb = model.vocab_size * model.hidden_size
        layers = model.num_params() - emb * (1 if model.tie_word_embeddings else 2) - model.hidden_size
        return _Dims(model.num_layers, model.hidden_size, model.head_dim, model.num_heads / tp,
                     max(1.0, model.num_kv_heads / tp), layers / tp, emb / tp, e)


def choose_exchange(num_new: int, num_cached: int, sp: int, model: ModelConfig, hw: HardwareProfile,
                    dtype_bytes: int, tp: int = 1) -> str:
    """Meta's Algorithm 1: pass-KV iff T >= s*C*g*e/(2*BW) (Eq. 2) or T/(T+P) >= 2g (Eq. 1), else pass-Q.

    C = attention FLOP/s per device (peak * attention_efficiency), BW = the SP group's link."""
    if sp <= 1:
        return "pass_kv"
    g = model.num_kv_heads / model.num_heads
    flops = hw.peak_flops_for(dtype_bytes) * hw.attention_efficiency
    bandwidth = hw.link_for(sp * tp).bandwidth_bytes_per_s
    hidden_threshold_tokens = sp * flops * g * dtype_bytes / (2 * bandwidth)
    miss_rate = num_new / (num_new + num_cached)
    return "pass_kv" if num_new >= hidden_threshold_tokens or miss_rate >= 2 * g else "pass_q"


def exchange_bytes(exchange: str, num_new: int, num_cached: int, sp: int, model: ModelConfig,
                   dtype_bytes: int, tp: int = 1) -> float:
    """Bytes one device sends per layer for an SP prefill chunk (formulas in the module docstring)."""
    if sp <= 1:
        return 0.0
    dm = _Dims.of(model, tp, dtype_bytes)
    t, c, s, e = num_new, num_cached, sp, dtype_bytes
    if exchange == "pass_kv":
        return (s - 1) * (t + c) / s * 2 * dm.hkv * dm.head_dim * e
    if exchange == "pass_q":
        return (s - 1) * t / s * dm.hq * dm.head_dim * e + (s - 1) / s * t * dm.hq * (dm.head_dim * e + LSE_BYTES)
    if exchange == "ulysses":
        return (s - 1) / s * (t / s) * (2 * dm.hq + 2 * dm.hkv) * dm.head_dim * e
    raise CspsError(f"unknown exchange {exchange!r}")


@dataclass(frozen=True)
class _Env:
    """Everything a step's terms need: per-device sizes and achieved rates."""

    dm: _Dims
    hw: HardwareProfile
    model: ModelConfig
    tp: int
    f_mm: float  # achieved GEMM FLOP/s
    f_attn: float  # achieved attention FLOP/s
    bw_mem: float  # achieved memory bytes/s
    sp_bw: float  # SP link bytes/s
    sp_lat: float


def _add(nbytes: dict[str, float], kind: str, num_bytes: float) -> None:
    nbytes[kind] = nbytes.get(kind, 0.0) + num_bytes


def _pick(ranks: list[_Rank], n: int, est: float) -> list[_Rank]:
    """The n least-loaded ranks (lowest index on ties); the first is the item's owner."""
    chosen = sorted(range(len(ranks)), key=lambda i: (ranks[i].load, i))[:n]
    for i in chosen:
        ranks[i].load += est
    return [ranks[i] for i in chosen]


def _place_decode(env: _Env, ranks: list[_Rank], ctx: int, s: int, est: float, nbytes: dict) -> float:
    dm, L = env.dm, env.dm.layers
    owned = _pick(ranks, s, est)
    owned[0].tokens += 1
    owned[0].logit_rows += 1
    for r in owned:
        r.dec_flops += 4 * ctx / s * dm.hq * dm.head_dim * L
        r.dec_bytes += ctx / s * 2 * dm.hkv * dm.head_dim * dm.e * L
    if s > 1:  # pass-Q: Q out to s-1 ranks, (out, LSE) back; the owner receives s-1 of them
        q_bytes, out_bytes = dm.hq * dm.head_dim * dm.e, dm.hq * (dm.head_dim * dm.e + LSE_BYTES)
        for r, n in zip(owned, [s - 1] + [1] * (s - 1)):
            r.comm_s += n * out_bytes * L / env.sp_bw
            r.exposed_s += n * out_bytes * L / env.sp_bw
            r.dec_sp = True
        _add(nbytes, "pass_q", (s - 1) * q_bytes * L * env.tp)
        _add(nbytes, "pass_q_out", (s - 1) * out_bytes * L * env.tp)
    return 4 * ctx * dm.hq * dm.head_dim * L * env.tp


def _place_prefill(env: _Env, ranks: list[_Rank], t: int, c: int, s: int, exchange: str, est: float,
                   nbytes: dict) -> float:
    dm, L, e = env.dm, env.dm.layers, env.dm.e
    owned = _pick(ranks, s, est)
    owned[0].logit_rows += 1
    attn_flops = 4 * t * (c + t / 2) * dm.hq * dm.head_dim * L / s  # per device, balanced (zigzag)
    attn_s = max(attn_flops / env.f_attn, (t + c) / s * 2 * dm.hkv * dm.head_dim * e * L / env.bw_mem)
    if exchange == "auto":
        exchange = choose_exchange(t, c, s, env.model, env.hw, e, env.tp)
    comm_s = exposed_s = 0.0
    if s > 1 and exchange in ("pass_kv", "pass_q"):
        msg = ((t + c) / s * 2 * dm.hkv if exchange == "pass_kv" else t / s * dm.hq) * dm.head_dim * e
        m = msg / env.sp_bw + env.sp_lat  # one ring step of one layer
        c_step = attn_s / L / s
        ring = (s - 1) * max(c_step, m) + c_step if env.hw.overlap else s * c_step + (s - 1) * m
        comm_s, exposed_s = (s - 1) * m * L, (ring - s * c_step) * L
        if exchange == "pass_q":  # partial outputs + LSE back to their owners: on the critical path
            a2a = (s - 1) / s * t * dm.hq * (dm.head_dim * e + LSE_BYTES)
            a2a_s = (a2a / env.sp_bw + (s - 1) * env.sp_lat) * L
            comm_s, exposed_s = comm_s + a2a_s, exposed_s + a2a_s
    elif s > 1:  # ulysses: all-to-alls of Q, K, V and the output, not overlapped
        a2a = exchange_bytes("ulysses", t, c, s, env.model, e, env.tp)
        comm_s = exposed_s = (a2a / env.sp_bw + 4 * (s - 1) * env.sp_lat) * L
    if s > 1:
        total = exchange_bytes(exchange, t, c, s, env.model, e, env.tp) * L * s * env.tp
        if exchange == "pass_q":
            q_part = (s - 1) * t / s * dm.hq * dm.head_dim * e * L * s * env.tp
            _add(nbytes, "pass_q", q_part)
            _add(nbytes, "pass_q_out", total - q_part)
        else:
            _add(nbytes, "ulysses_a2a" if exchange == "ulysses" else exchange, total)
    for r in owned:
        r.tokens += t / s
        r.attn_s += attn_s
        r.comm_s += comm_s
        r.exposed_s += exposed_s
    return attn_flops * s * env.tp


def predict_step(shape: StepShape, model: ModelConfig, hw: HardwareProfile, dtype_bytes: int) -> StepCost:
    """Predicted wall time of one step on `hw` (see the module docstring for every term)."""
    tp, num_sp = shape.tp, shape.sp_ranks
    dm = _Dims.of(model, tp, dtype_bytes)
    L, e = dm.layers, dtype_bytes
    sp_link, tp_link = hw.link_for(num_sp * tp), hw.link_for(tp)
    env = _Env(dm, hw, model, tp, hw.peak_flops_for(e) * hw.matmul_efficiency,
               hw.peak_flops_for(e) * hw.attention_efficiency, hw.mem_bandwidth_bytes_per_s * hw.mem_efficiency,
               sp_link.bandwidth_bytes_per_s, sp_link.latency_s)
    ranks = [_Rank() for _ in range(num_sp)]
    nbytes: dict[str, float] = {}
    flops = 0.0
    # biggest items first onto the least-loaded ranks; the load estimate is compute or KV-read time
    items = [(2 * dm.layer_params * t / s / env.f_mm + 4 * t * (c + t / 2) * dm.hq * dm.head_dim * L / s / env.f_attn,
              (t, c, s)) for t, c, s in shape.prefills]
    items += [(ctx / s * 2 * dm.hkv * dm.head_dim * e * L / env.bw_mem, (ctx, s)) for ctx, s in shape.decodes]
    for est, item in sorted(items, key=lambda it: -it[0]):
        if len(item) == 2:
            flops += _place_decode(env, ranks, *item, est, nbytes)
        else:
            flops += _place_prefill(env, ranks, *item, shape.exchange, est, nbytes)

    best = (0.0, 0.0, 0.0, 0.0, 0.0)
    decode_latency_s = 2 * (num_sp - 1) * sp_link.latency_s * L  # one batched pass-Q exchange per layer
    for r in ranks:
        linear_s = 0.0
        if r.tokens > 0:
            tile = hw.gemm_tile_tokens
            rows = -(-math.ceil(r.tokens - 1e-9) // tile) * tile  # GEMM rows padded to the tile
            lin_flops = 2 * dm.layer_params * rows + 2 * dm.head_params * r.logit_rows
            flops += (2 * dm.layer_params * r.tokens + 2 * dm.head_params * r.logit_rows) * tp  # useful FLOPs
            linear_s = max(lin_flops / env.f_mm, (dm.layer_params + dm.head_params) * e / env.bw_mem)
        attn_s = r.attn_s + max(r.dec_flops / env.f_attn, r.dec_bytes / env.bw_mem)
        comm_s, exposed_s = r.comm_s, r.exposed_s
        if r.dec_sp:
            comm_s, exposed_s = comm_s + decode_latency_s, exposed_s + decode_latency_s
        if tp > 1 and r.tokens > 0:
            ar_bytes = 2 * (tp - 1) / tp * r.tokens * dm.d * e  # one ring all-reduce, per device
            ar_s = ar_bytes / tp_link.bandwidth_bytes_per_s + 2 * math.ceil(math.log2(tp)) * tp_link.latency_s
            comm_s, exposed_s = comm_s + 2 * L * ar_s, exposed_s + 2 * L * ar_s
            _add(nbytes, "tp_allreduce", 2 * L * ar_bytes * tp)
        rank_s = linear_s + attn_s + exposed_s
        if rank_s > best[0]:
            best = (rank_s, linear_s, attn_s, comm_s, exposed_s)
    overhead_s = (hw.step_overhead_s + hw.seq_overhead_s * shape.num_seqs) if shape.num_seqs else 0.0
    rank_s, linear_s, attn_s, comm_s, exposed_s = best
    return StepCost(total_s=overhead_s + rank_s, linear_s=linear_s, attention_s=attn_s, comm_s=comm_s,
                    exposed_comm_s=exposed_s, overhead_s=overhead_s, bytes_by_kind=nbytes, flops=flops,
                    num_devices=num_sp * tp)


def largest_chunk_within(time_budget_s: float, decodes, num_cached: int, model: ModelConfig,
                         hw: HardwareProfile, dtype_bytes: int, *, max_tokens: int, sp_degree: int = 1,
                         tp: int = 1, exchange: str = "auto", block_size: int = 128, prefills=(),
                         num_sp_ranks: int = 0) -> int:
    """Medha-style adaptive chunking: the largest prefill chunk (a multiple of block_size, or all of
    max_tokens) over num_cached cached tokens that, with `decodes` and `prefills` already in the step,
    keeps the predicted step time within time_budget_s. 0 when not even one block fits."""
    _check(block_size >= 1, "block_size must be >= 1")

    def fits(n: int) -> bool:
        shape = StepShape(prefills=(*prefills, (n, num_cached, sp_degree)), decodes=decodes, exchange=exchange,
                          tp=tp, num_sp_ranks=num_sp_ranks)
        return predict_step(shape, model, hw, dtype_bytes).total_s <= time_budget_s

    if max_tokens <= 0:
        return 0
    if fits(max_tokens):
        return max_tokens
    lo, hi = 0, (max_tokens - 1) // block_size  # in blocks: lo fits (0 = nothing), hi is the last candidate
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid * block_size):
            lo = mid
        else:
            hi = mid - 1
    return lo * block_size


@dataclass(frozen=True)
class FitResult:
    profile: HardwareProfile
    rel_errors: tuple[float, ...]  # (predicted - measured) / measured, per sample
    iterations: int

    @property
    def median_abs_rel_error(self) -> float:
        return statistics.median(abs(x) for x in self.rel_errors) if self.rel_errors else 0.0


def _theta_to_profile(hw: HardwareProfile, names, theta) -> HardwareProfile:
    kw = {n: float(1.0 / v if n in _EFFICIENCIES else v) for n, v in zip(names, theta)}
    return replace(hw, **kw)


def fit(samples, hw: HardwareProfile, model: ModelConfig, dtype_bytes: int, params=FIT_PARAMS,
        max_iterations: int = 50) -> FitResult:
    """Calibrate `params` of hw from measured (StepShape, seconds) pairs, minimising relative error.

    The prediction is piecewise linear in theta = (1/efficiencies, overheads): Gauss-Newton with exact
    finite-difference slopes is a linear least-squares solve per linear piece, iterated until the set
    of active roofline branches stops changing. Parameters that no sample exercises keep their value;
    efficiencies are clamped to (0, 1], overheads to >= 0.
    """
    import numpy as np  # lazy: only calibration needs it

    samples = list(samples)
    _check(len(samples) >= 1, "fit needs at least one (StepShape, seconds) sample")
    _check(all(sec > 0 for _, sec in samples), "fit needs positive measured times")
    names = list(params)
    _check(all(n in FIT_PARAMS for n in names), f"fit can calibrate only {', '.join(FIT_PARAMS)}")
    y = np.array([sec for _, sec in samples])
    w = 1.0 / y  # relative error

    def predict(theta) -> np.ndarray:
        prof = _theta_to_profile(hw, names, theta)
        return np.array([predict_step(shape, model, prof, dtype_bytes).total_s for shape, _ in samples])

    theta = np.array([1.0 / getattr(hw, n) if n in _EFFICIENCIES else getattr(hw, n) for n in names])
    used = np.zeros(len(names), dtype=bool)
    iterations = 0
    for iterations in range(1, max_iterations + 1):
        base = predict(theta)
        jac = np.zeros((len(samples), len(names)))
        for k in range(len(names)):
            step = 1e-6 * max(abs(theta[k]), 1e-3)
            shifted = theta.copy()
            shifted[k] += step
            jac[:, k] = (predict(shifted) - base) / step
        active = np.abs(jac).max(axis=0) > 0
        used |= active
        const = base - jac @ theta
        new = theta.copy()
        if active.any():
            sol, *_ = np.linalg.lstsq(jac[:, active] * w[:, None], (y - const) * w, rcond=None)
            new[active] = sol
        for k, n in enumerate(names):
            new[k] = min(max(new[k], 1.0), 1e9) if n in _EFFICIENCIES else max(new[k], 0.0)
        done = np.allclose(new, theta, rtol=1e-9, atol=1e-12)
        theta = new
        if done:
            break
    profile = _theta_to_profile(hw, [n for n, u in zip(names, used) if u], theta[used])
    pred = np.array([predict_step(s, model, profile, dtype_bytes).total_s for s, _ in samples])
    return FitResult(profile=profile, rel_errors=tuple(float(x) for x in (pred - y) / y), iterations=iterations)
