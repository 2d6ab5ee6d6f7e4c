"""Decode attention over the paged KV cache: one query token per sequence, a batch of mixed lengths.

``paged_decode`` is the one entry point (device dispatch):
  * CPU with the C++ kernels built (``cpu_ext``): ``torch.ops.csps.paged_decode`` reads each
    sequence's blocks in place and accumulates in fp32 — no gathered copy of the KV, no cast of the
    cache (fp32 or bf16), split over (sequence, partition of keys, KV head) so a single long sequence
    keeps every thread busy;
  * CUDA: flash-attn's paged decode (``cuda_attention.flash_decode_paged``);
  * otherwise (no compiler, a head dim that is not a multiple of 8) ``paged_decode_torch``: the blocks gathered into a padded batch, then
    ``decode_attention`` in fp32 — the plain-torch twin and the oracle of the others.

Block tables live in one persistent tensor per rank (a row per request, ``[rows, max_blocks]``
int32, unused entries 0 = the reserved zero block); a step names the rows of its sequences, so no
table is rebuilt in Python per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from csps.kernels import cpu_ext
from csps.kernels.attention_torch import decode_attention
from csps.kernels.paged import gather_kv_padded

# keys per (sequence, KV head) work item of the C++ kernel: small enough that a batch of one long
# sequence splits over the threads, large enough that the merge is negligible
PARTITION_TOKENS = 512


@dataclass(frozen=True)
class HeadGroups:
    """Which local KV head each local query head reads, and the inverse (the query heads of each KV
    head, CSR) so a kernel reads every KV row once for all the query heads that share it."""

    kv_of_q: torch.Tensor  # [Hq] int64
    offsets: torch.Tensor  # [Hkv + 1] int64
    q_index: torch.Tensor  # [Hq] int64: query heads of KV head h are q_index[offsets[h]:offsets[h + 1]]
    grouped: bool  # kv_of_q == arange(Hq) // (Hq // Hkv): the plain GQA layout

    @staticmethod
    def of(num_q_heads: int, num_kv_heads: int, kv_head_map: list[int] | None = None) -> HeadGroups:
        """``kv_head_map``: local KV head of each local query head (uneven TP splits); None = GQA."""
        if kv_head_map is None:
            kv_of_q = torch.arange(num_q_heads) // (num_q_heads // num_kv_heads)
        else:
            kv_of_q = torch.tensor(kv_head_map, dtype=torch.int64)
        counts = torch.bincount(kv_of_q, minlength=num_kv_heads)
        offsets = torch.cat([torch.zeros(1, dtype=torch.int64), counts.cumsum(0)])
        grouped = num_q_heads % num_kv_heads == 0 and bool(
            (kv_of_q == torch.arange(num_q_heads) // (num_q_heads // num_kv_heads)).all())
        return HeadGroups(kv_of_q, offsets, torch.argsort(kv_of_q, stable=True), grouped)

    def to(self, device: torch.device | str) -> HeadGroups:
        """The maps on ``device`` (index_select needs them where the KV is; the C++ kernel reads them on the
        CPU, where they stay for a CPU rank)."""
        return HeadGroups(self.kv_of_q.to(device), self.offsets.to(device), self.q_index.to(device), self.grouped)


def paged_decode_torch(q, k_cache, v_cache, block_tables, table_rows, kv_lens, max_kv_len: int, heads: HeadGroups,
                       scale: float, sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain-torch twin: gather the blocks into a padded batch, attend in fp32 (``decode_attention``)."""
    width = max(1, -(-max_kv_len // k_cache.shape[1]))
    tables = block_tables[table_rows, :width].long()
    kc, vc = gather_kv_padded(k_cache, v_cache, tables)  # [B, width * bs, Hkv, D]
    if not heads.grouped:
        kc, vc = kc.index_select(2, heads.kv_of_q), vc.index_select(2, heads.kv_of_q)
    return decode_attention(q, kc, vc, kv_lens, scale, sliding_window)


def paged_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                 table_rows: torch.Tensor, kv_lens: torch.Tensor, max_kv_len: int, heads: HeadGroups, scale: float,
                 sliding_window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One query per sequence over its cached keys (its own key already written; it sees them all, or
    the last ``sliding_window``).

    q: [B, Hq, D]; k/v_cache: [num_blocks, block_size, Hkv, D]; block_tables: [rows, W] int32;
    table_rows: [B] int64 (each sequence's row); kv_lens: [B] int64, all on the cache's device;
    max_kv_len: max(kv_lens), known on the host (no device sync).
    Returns out [B, Hq, D] (q's dtype) and lse [B, Hq] fp32 (-inf, out 0 for a sequence without keys).
    """
    if q.shape[0] == 0:
        return q.new_zeros(q.shape), torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    if q.is_cuda:
        if heads.grouped:
            from csps.kernels.cuda_attention import flash_decode_paged

            width = max(1, -(-max_kv_len // k_cache.shape[1]))
            return flash_decode_paged(q, k_cache, v_cache, block_tables[table_rows, :width], kv_lens, scale,
                                      sliding_window)
    elif q.shape[-1] % 16 == 0 and q.shape[-1] <= 128 and cpu_ext.available():  # 8-/16-lane vectors, <= 8 a row
        out, lse = torch.ops.csps.paged_decode(
            q, k_cache, v_cache, block_tables, table_rows, kv_lens, heads.offsets, heads.q_index, scale, sliding_window or 0, PARTITION_TOKENS)
        return out.to(q.dtype), lse
    return paged_decode_torch(q, k_cache, v_cache, block_tables, table_rows, kv_lens, max_kv_len, heads, scale,
                              sliding_window)
