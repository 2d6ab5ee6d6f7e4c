"""The KV-cache block pool and per-request block tables of one rank (pure Python, no torch).

* ``BlockPool``: fixed-size blocks with reference counts, a free queue in LRU order and a
  content-hash -> block map for prefix caching. Block 0 is reserved (kept zero, used as padding).
* ``KVCacheManager``: each request's block table, grown incrementally step by step
  (``allocate_slots``), freed on finish/abort/preemption. Full blocks are hashed by their content
  (chained with the previous block's hash, plus an optional placement key for sequence-parallel
  shards) and registered, so a later request with the same prefix adopts them instead of
  recomputing; freed blocks stay cached until evicted (least recently freed first).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Callable


def block_hash(parent: bytes, token_ids: list[int], extra: bytes = b"") -> bytes:
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(array("q", token_ids).tobytes())
    h.update(extra)
    return h.digest()


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (block 0 is reserved)")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.hash_of: list[bytes | None] = [None] * num_blocks
        self.block_of_hash: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(1, num_blocks))
        self.num_evictions = 0
        self.peak_used = 0  # high-water mark of num_used

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (free, including cached-but-unused ones)."""
        return len(self.free_queue)

    @property
    def num_used(self) -> int:
        return self.num_blocks - 1 - len(self.free_queue)

    @property
    def capacity_tokens(self) -> int:
        return (self.num_blocks - 1) * self.block_size

    def allocate(self, n: int) -> list[int] | None:
        if n > len(self.free_queue):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            if self.hash_of[b] is not None:  # evict its cached content
                del self.block_of_hash[self.hash_of[b]]
                self.hash_of[b] = None
                self.num_evictions += 1
            self.ref_counts[b] = 1
            out.append(b)
        self.peak_used = max(self.peak_used, self.num_used)
        return out

    def free(self, blocks: list[int]) -> None:
        """Drop one reference each; tail blocks first so prefixes stay cached longest."""
        for b in reversed(blocks):
            self.ref_counts[b] -= 1
            assert self.ref_counts[b] >= 0, f"block {b} freed twice"
            if self.ref_counts[b] == 0:
                if self.hash_of[b] is None:
                    self.free_queue[b] = None
                    self.free_queue.move_to_end(b, last=False)  # uncached: reuse first
                else:
                    self.free_queue[b] = None  # cached: evict last

    def lookup(self, h: bytes) -> int | None:
        return self.block_of_hash.get(h) if self.enable_prefix_caching else None

    def acquire(self, b: int) -> None:
        """Take a reference on a cached block (a prefix-cache hit)."""
        if self.ref_counts[b] == 0:
            del self.free_queue[b]
        self.ref_counts[b] += 1

    def register(self, b: int, h: bytes) -> None:
        if not self.enable_prefix_caching or h in self.block_of_hash or self.hash_of[b] is not None:
            return
        self.hash_of[b] = h
        self.block_of_hash[h] = b


class KVCacheManager:
    """Block tables of the requests that have KV on this rank."""

    def __init__(self, pool: BlockPool) -> None:
        self.pool = pool
        self.block_size = pool.block_size
        self.tables: dict[str, list[int]] = {}
        self.hashes: dict[str, list[bytes]] = {}
        self.num_lookup_tokens = 0  # prefix-cache statistics
        self.num_hit_tokens = 0

    def blocks_needed(self, req_id: str, num_tokens: int) -> int:
        have = len(self.tables.get(req_id, ()))
        return max(0, -(-num_tokens // self.block_size) - have)

    def can_allocate(self, req_id: str, num_tokens: int, reserve_blocks: int = 0) -> bool:
        return self.blocks_needed(req_id, num_tokens) + reserve_blocks <= self.pool.num_free

    def allocate_slots(self, req_id: str, num_tokens: int) -> bool:
        """Grow the request's table to hold ``num_tokens`` tokens; False (and no change) if full."""
        need = self.blocks_needed(req_id, num_tokens)
        if need == 0:
            self.tables.setdefault(req_id, [])
            return True
        new = self.pool.allocate(need)
        if new is None:
            return False
        self.tables.setdefault(req_id, []).extend(new)
        return True

    def find_cached_prefix(self, block_tokens: Callable[[int], list[int]], max_blocks: int,
                           extra: bytes = b"") -> list[int]:
        """Blocks holding the longest cached prefix (at most ``max_blocks``); ``block_tokens(i)``
        gives the tokens of the request's i-th block on this rank."""
        if not self.pool.enable_prefix_caching:
            return []
        parent, hits = b"", []
        for i in range(max_blocks):
            parent = block_hash(parent, block_tokens(i), extra)
            b = self.pool.lookup(parent)
            if b is None:
                break
            hits.append(b)
        return hits

    def adopt_prefix(self, req_id: str, blocks: list[int]) -> None:
        """Make cached blocks the start of the request's table (the request was just admitted)."""
        assert not self.tables.get(req_id), "prefix adoption must happen before any allocation"
        for b in blocks:
            self.pool.acquire(b)
        self.tables[req_id] = list(blocks)

    def record_lookup(self, num_lookup_tokens: int, num_hit_tokens: int) -> None:
        self.num_lookup_tokens += num_lookup_tokens
        self.num_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, req_id: str, block_tokens: Callable[[int], list[int]],
                          num_computed: int, extra: bytes = b"") -> None:
        """Register every block whose tokens are all computed (call after each step)."""
        if not self.pool.enable_prefix_caching:
            return
        table = self.tables.get(req_id, [])
        hashes = self.hashes.setdefault(req_id, [])
        for i in range(len(hashes), min(num_computed // self.block_size, len(table))):
            parent = hashes[-1] if hashes else b""
            h = block_hash(parent, block_tokens(i), extra)
            hashes.append(h)
            self.pool.register(table[i], h)

    def free(self, req_id: str) -> None:
        blocks = self.tables.pop(req_id, None)
        self.hashes.pop(req_id, None)
        if blocks:
            self.pool.free(blocks)

    def table(self, req_id: str) -> list[int]:
        return self.tables.get(req_id, [])

    @property
    def hit_rate(self) -> float:
        return self.num_hit_tokens / self.num_lookup_tokens if self.num_lookup_tokens else 0.0
