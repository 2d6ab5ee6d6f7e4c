"""Which attention heads and MLP columns a tensor-parallel rank holds (Megatron style; no torch).

Query heads are split as evenly as possible and contiguously over the TP ranks (SmolLM2's 9 heads
over TP 2 give 5 + 4); each rank keeps the KV heads its query heads use (GQA: query head h uses KV
head h // (Hq // Hkv)), so a KV head is replicated on every rank whose query heads need it when the
KV heads do not divide evenly. This is the one place that decides it: the model's weights, the KV
cache size and the cost model all ask here.
"""

from __future__ import annotations

from dataclasses import dataclass


def split_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """The index-th of ``parts`` near-equal contiguous pieces of range(n) (sizes differ by <= 1)."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return start, start + base + (1 if index < extra else 0)


@dataclass(frozen=True)
class TPShard:
    tp_rank: int = 0
    tp_size: int = 1

    def head_range(self, num_heads: int) -> tuple[int, int]:
        return split_range(num_heads, self.tp_size, self.tp_rank)

    def kv_head_range(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        q0, q1 = self.head_range(num_heads)
        group = num_heads // num_kv_heads
        return q0 // group, (q1 - 1) // group + 1

    def kv_head_of_q_head(self, num_heads: int, num_kv_heads: int) -> list[int]:
        """For each local query head, the index of its KV head among the local KV heads."""
        q0, q1 = self.head_range(num_heads)
        k0, _ = self.kv_head_range(num_heads, num_kv_heads)
        group = num_heads // num_kv_heads
        return [h // group - k0 for h in range(q0, q1)]

    def kv_head_map(self, num_heads: int, num_kv_heads: int) -> list[int] | None:
        """``kv_head_of_q_head`` where the local heads do not group evenly (the kernels then expand
        K/V per query head); None where every local KV head serves the same number of query heads."""
        q0, q1 = self.head_range(num_heads)
        k0, k1 = self.kv_head_range(num_heads, num_kv_heads)
        if (q1 - q0) == (k1 - k0) * (num_heads // num_kv_heads):
            return None
        return self.kv_head_of_q_head(num_heads, num_kv_heads)


def max_kv_heads_per_rank(num_heads: int, num_kv_heads: int, tp: int) -> int:
    """The most KV heads any TP rank holds (every rank's KV pool is sized for it)."""
    return max(b - a for a, b in (TPShard(r, tp).kv_head_range(num_heads, num_kv_heads) for r in range(tp)))
