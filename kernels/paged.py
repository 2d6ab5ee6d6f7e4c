"""The paged KV cache layout and its scatter/gather.

One tensor per layer and kind: k_cache, v_cache: [num_blocks, block_size, Hkv, D]. A token's slot is
``block_id * block_size + offset``. Block 0 is never handed out (kept zero) so padded block
tables can point at it safely.
"""

from __future__ import annotations

import torch


def write_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor
) -> None:
    # k/v: [T, Hkv, D], slots: [T] int64
    nb, bs, h, d = k_cache.shape
    k_cache.view(nb * bs, h, d).index_copy_(0, slots, k.to(k_cache.dtype))
    v_cache.view(nb * bs, h, d).index_copy_(0, slots, v.to(v_cache.dtype))


def gather_kv(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_ids: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``num_tokens`` cached tokens of one sequence: k/v [num_tokens, Hkv, D]."""
    nb, bs, h, d = k_cache.shape
    need = (num_tokens + bs - 1) // bs
    ids = block_ids[:need]
    k = k_cache.index_select(0, ids).view(-1, h, d)[:num_tokens]
    v = v_cache.index_select(0, ids).view(-1, h, d)[:num_tokens]
    return k, v


def gather_kv_padded(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """block_tables: [B, nb] (padded with block 0) -> k/v [B, nb * block_size, Hkv, D]."""
    b, n = block_tables.shape
    _, bs, h, d = k_cache.shape
    k = k_cache[block_tables].view(b, n * bs, h, d)
    v = v_cache[block_tables].view(b, n * bs, h, d)
    return k, v
