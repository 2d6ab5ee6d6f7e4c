"""Token sharding of a prefill chunk over P sequence-parallel ranks.

A chunk of n tokens has local indices 0..n-1 (its positions are ``start_pos + index``). A shard is
a list of half-open index ranges ``(start, end)``; a rank's tokens are the concatenation of its
ranges, in order, and its positions are permuted identically:
``positions = start_pos + shard_indices(ranges)``.

* contiguous: rank i gets one range; sizes differ by at most 1 (the first n % P ranks get one more).
  With a causal mask the last rank does ~(2P-1)x the work of the first.
* zigzag (Megatron / Meta CP): 2P pieces (sizes differ by at most 1, empty when n < 2P),
  rank i gets pieces i and 2P-1-i, which balances causal work.
"""

from __future__ import annotations

from typing import Sequence

import torch

Range = tuple[int, int]


def contiguous_shards(n: int, num_ranks: int) -> list[Range]:
    """Split 0..n-1 into ``num_ranks`` consecutive ranges whose sizes differ by at most 1."""
    if n < 0 or num_ranks < 1:
        raise ValueError(f"need n >= 0 and num_ranks >= 1 (got n={n}, num_ranks={num_ranks})")
    base, extra = divmod(n, num_ranks)
    out, start = [], 0
    for i in range(num_ranks):
        end = start + base + (1 if i < extra else 0)
        out.append((start, end))
        start = end
    return out


def zigzag_shards(n: int, num_ranks: int) -> list[list[Range]]:
    """Rank i gets pieces i and 2P-1-i of 2P near-equal pieces (in that order)."""
    pieces = contiguous_shards(n, 2 * num_ranks)
    return [[pieces[i], pieces[2 * num_ranks - 1 - i]] for i in range(num_ranks)]


def _as_ranges(shard: Range | Sequence[Range]) -> list[Range]:
    """Accept a single (start, end) or a list of them."""
    if len(shard) == 2 and all(isinstance(x, int) for x in shard):
        return [tuple(shard)]  # type: ignore[list-item]
    return [tuple(r) for r in shard]  # type: ignore[misc]


def shard_indices(ranges: Range | Sequence[Range]) -> torch.Tensor:
    """LongTensor [num_tokens] of the chunk-local indices of a shard, in shard order."""
    parts = [torch.arange(s, e, dtype=torch.int64) for s, e in _as_ranges(ranges)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)


def shard_sizes(shards: Sequence[Range | Sequence[Range]]) -> list[int]:
    """Number of tokens per rank."""
    return [sum(e - s for s, e in _as_ranges(sh)) for sh in shards]


def causal_work_pairs(ranges: Range | Sequence[Range], num_cached_tokens: int = 0) -> int:
    """Visible (query, key) pairs of a shard's queries under a causal mask.

    The query at chunk index t sees the ``num_cached_tokens`` tokens before the chunk and chunk
    tokens 0..t, i.e. ``num_cached_tokens + t + 1`` keys.
    """
    total = 0
    for s, e in _as_ranges(ranges):
        total += (e - s) * num_cached_tokens + (e * (e + 1) - s * (s + 1)) // 2
    return total


def causal_work_per_rank(
    shards: Sequence[Range | Sequence[Range]], num_cached_tokens: int = 0
) -> list[int]:
    """``causal_work_pairs`` for every rank's shard (contiguous or zigzag)."""
    return [causal_work_pairs(sh, num_cached_tokens) for sh in shards]
