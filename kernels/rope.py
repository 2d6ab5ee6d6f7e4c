"""Rotary position embeddings (the "rotate half" layout Hugging Face Llama uses).

Positions are explicit per token, so a zigzag shard of a sequence-parallel prefill chunk rotates
its tokens by their true positions. Scaling for long contexts: ``linear`` (position interpolation),
``llama3`` (Llama 3.1's frequency-band rescaling) and ``yarn`` (NTK-by-parts + attention factor).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from csps.kernels import cpu_ext


@dataclass(frozen=True)
class RopeScaling:
    rope_type: str = "default"  # default | linear | llama3 | yarn
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    attention_factor: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.rope_type not in ("default", "linear", "llama3", "yarn"):
            raise ValueError(
                f"unsupported rope scaling type {self.rope_type!r} "
                "(supported: default, linear, llama3, yarn)"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be positive, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise ValueError(f"rope scaling {self.rope_type} needs original_max_position_embeddings")

    @staticmethod
    def from_hf(d: dict | None) -> RopeScaling:
        """From a Hugging Face ``rope_scaling`` / ``rope_parameters`` dict (``None`` = no scaling)."""
        if not d:
            return RopeScaling()
        rope_type = d.get("rope_type", d.get("type", "default"))
        kw = {k: d[k] for k in RopeScaling.__dataclass_fields__ if k in d and d[k] is not None}
        kw.pop("rope_type", None)
        if "factor" in kw:
            kw["factor"] = float(kw["factor"])
        return RopeScaling(rope_type=rope_type, **kw)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [head_dim // 2] (fp32) and the factor applied to cos/sin."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    t = scaling.rope_type
    if t == "default":
        return inv_freq, 1.0
    if t == "linear":
        return inv_freq / scaling.factor, 1.0
    if t == "llama3":
        old_ctx = scaling.original_max_position_embeddings
        low_wavelen = old_ctx / scaling.low_freq_factor
        high_wavelen = old_ctx / scaling.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_ctx / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        out = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
        mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
        return torch.where(mid, blended, out), 1.0
    # yarn: interpolate low frequencies, extrapolate high ones, ramp in between.
    old_ctx = scaling.original_max_position_embeddings
    factor = scaling.factor

    def correction_dim(num_rotations: float) -> float:
        return (head_dim * math.log(old_ctx / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low = correction_dim(scaling.beta_fast)
    high = correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_weight = 1 - ramp
    inv_freq = (inv_freq / factor) * (1 - extrapolation_weight) + inv_freq * extrapolation_weight
    if scaling.attention_factor is not None:
        attn_factor = scaling.attention_factor
    elif scaling.mscale and scaling.mscale_all_dim:
        attn_factor = _yarn_mscale(factor, scaling.mscale) / _yarn_mscale(factor, scaling.mscale_all_dim)
    else:
        attn_factor = _yarn_mscale(factor)
    return inv_freq, float(attn_factor)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, attn_factor: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [T, head_dim] for integer positions [T], computed in fp32 then cast."""
    freqs = positions.float()[:, None] * inv_freq[None, :]  # [T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [T, D]
    return (emb.cos() * attn_factor).to(dtype), (emb.sin() * attn_factor).to(dtype)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in place (x may be a view with strided rows, e.g. the q and k heads of a fused QKV output): the C++
    kernel on the CPU, else ``apply_rope`` copied back."""
    # x: [T, H, D], cos/sin: [T, D] -> x
    if cpu_ext.handles(x, cos, sin) and x.stride(-1) == 1 and cos.is_contiguous() and sin.is_contiguous():
        return torch.ops.csps.rope_(x, cos, sin)
    return x.copy_(apply_rope(x, cos, sin))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The plain-torch RoPE (a new tensor): the twin of ``apply_rope_``."""
    # x: [T, H, D], cos/sin: [T, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]
