"""csps.kernels: math on one device.

Attention returning ``(out, lse)`` with an fp32 log-sum-exp, the -inf-safe LSE merge, RoPE,
RMSNorm, the paged KV-cache writes/gathers and decode attention over the paged cache (``decode``, a C++
kernel built by ``cpu_ext``). Every fast path has a plain fp32 torch twin
(``attention_ref``, ``rms_norm_ref``) that tests use as the oracle. This package imports nothing
from ``csps.parallel`` or ``csps.server``.
"""

from csps.kernels.attention import attention
from csps.kernels.attention_ref import attention_ref, visibility_mask
from csps.kernels.attention_torch import attention_torch, decode_attention
from csps.kernels.merge import merge_attn, merge_many
from csps.kernels.norm import rms_norm, rms_norm_ref
from csps.kernels.paged import gather_kv, gather_kv_padded, write_kv
from csps.kernels.rope import RopeScaling, apply_rope, rope_cos_sin, rope_inv_freq

__all__ = [
    "attention",
    "attention_torch",
    "decode_attention",
    "attention_ref",
    "visibility_mask",
    "merge_attn",
    "merge_many",
    "rms_norm",
    "rms_norm_ref",
    "gather_kv",
    "gather_kv_padded",
    "write_kv",
    "RopeScaling",
    "apply_rope",
    "rope_cos_sin",
    "rope_inv_freq",
]
