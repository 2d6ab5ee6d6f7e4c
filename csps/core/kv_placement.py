"""Which rank holds which token of a sequence-parallel request (pure functions, no torch).

Positions are grouped into granules of ``granule`` tokens (the KV block size) and every 2P
granules form a stripe split zigzag over the P SP ranks: granule i of a stripe goes to rank i for
i < P and to rank 2P-1-i otherwise (rank r holds pieces r and 2P-1-r, Megatron/Meta zigzag).
Placement is therefore a function of the position alone:
  * every prefill chunk is balanced over the ranks (causal work within a few % of the mean),
    whatever its size or where it starts;
  * decode tokens land round-robin by block (in zigzag order), keeping KV memory even;
  * a rank's KV for a request is its positions in increasing order, so its blocks have the same
    content for the same prefix and the prefix cache works per rank.
"""

from __future__ import annotations

Ranges = list[tuple[int, int]]


def rank_of(pos: int, sp: int, granule: int) -> int:
    i = (pos // granule) % (2 * sp)
    return i if i < sp else 2 * sp - 1 - i


def count_before(x: int, rank: int, sp: int, granule: int) -> int:
    """How many positions < x rank ``rank`` holds."""
    stripe = 2 * sp * granule
    full, rest = divmod(x, stripe)
    n = full * 2 * granule
    first = rank * granule  # piece ``rank`` of the partial stripe
    second = (2 * sp - 1 - rank) * granule
    n += min(max(rest - first, 0), granule) + min(max(rest - second, 0), granule)
    return n


def shares(start: int, end: int, sp: int, granule: int) -> list[int]:
    """Tokens of positions [start, end) per rank."""
    return [count_before(end, r, sp, granule) - count_before(start, r, sp, granule) for r in range(sp)]


def ranges_per_rank(start: int, end: int, sp: int, granule: int) -> list[Ranges]:
    """Positions [start, end) of each rank as sorted, merged (start, end) ranges."""
    out: list[Ranges] = [[] for _ in range(sp)]
    pos = start
    while pos < end:
        nxt = min(end, (pos // granule + 1) * granule)
        r = rank_of(pos, sp, granule)
        if out[r] and out[r][-1][1] == pos:
            out[r][-1] = (out[r][-1][0], nxt)
        else:
            out[r].append((pos, nxt))
        pos = nxt
    return out


def local_to_pos(i: int, rank: int, sp: int, granule: int) -> int:
    """Position of the i-th token (in position order) that rank ``rank`` holds."""
    stripe, within = divmod(i, 2 * granule)
    piece = rank if within < granule else 2 * sp - 1 - rank
    return stripe * 2 * sp * granule + piece * granule + within % granule


def placement_key(rank: int, sp: int) -> bytes:
    """Mixed into a block's content hash: the same tokens placed differently are different KV."""
    return f"sp{sp}r{rank}".encode()
