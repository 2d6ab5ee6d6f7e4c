"""The fp32 reference attention: the oracle every fast attention path is tested against.

Visibility is defined by token positions, which covers every case csps needs with one rule:
a whole prompt, a prefill chunk on top of cached KV, zigzag shards of a sequence-parallel chunk,
and Mistral's sliding window. Query at position p sees key at position s iff ``s <= p`` and, with a
window W, ``p - s < W``.
"""

from __future__ import annotations

import torch


def visibility_mask(
    q_pos: torch.Tensor, k_pos: torch.Tensor, sliding_window: int | None = None
) -> torch.Tensor:
    """Boolean [Tq, Tk] mask, True where the query may attend to the key."""
    # q_pos: [Tq] int64, k_pos: [Tk] int64
    diff = q_pos[:, None] - k_pos[None, :]
    visible = diff >= 0
    if sliding_window is not None:
        visible &= diff < sliding_window
    return visible


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    scale: float | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain softmax attention in fp32.

    q: [Tq, Hq, D], k/v: [Tk, Hkv, D] (Hq a multiple of Hkv: GQA, query head h uses kv head
    h // (Hq // Hkv)). Returns out [Tq, Hq, D] in q's dtype and lse [Tq, Hq] in fp32 (natural log).
    Rows with no visible key get out = 0 and lse = -inf.
    """
    tq, hq, d = q.shape
    hkv = k.shape[1]
    scale = d**-0.5 if scale is None else scale
    group = hq // hkv
    qf = q.float().transpose(0, 1)  # [Hq, Tq, D]
    kf = k.float().transpose(0, 1).repeat_interleave(group, dim=0)  # [Hq, Tk, D]
    vf = v.float().transpose(0, 1).repeat_interleave(group, dim=0)
    scores = torch.matmul(qf, kf.transpose(1, 2)) * scale  # [Hq, Tq, Tk]
    visible = visibility_mask(q_pos, k_pos, sliding_window)
    scores = scores.masked_fill(~visible[None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Hq, Tq]
    has_key = visible.any(-1)  # [Tq]
    probs = torch.exp(scores - torch.where(has_key[None, :, None], lse[..., None], 0.0))
    out = torch.matmul(probs, vf)  # [Hq, Tq, D]
    lse = torch.where(has_key[None, :], lse, float("-inf"))
    return out.transpose(0, 1).to(q.dtype), lse.transpose(0, 1).contiguous()
