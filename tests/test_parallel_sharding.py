"""Token sharding: coverage, piece sizes, positions, and causal load balance (no processes)."""

import pytest
import torch
from csps.kernels import visibility_mask
from csps.parallel.sharding import (
    causal_work_pairs,
    causal_work_per_rank,
    contiguous_shards,
    shard_indices,
    shard_sizes,
    zigzag_shards,
)


@pytest.mark.parametrize("n", [0, 1, 7, 64, 4097])
@pytest.mark.parametrize("num_ranks", [1, 2, 3, 4])
def test_contiguous_covers_and_is_even(n, num_ranks):
    shards = contiguous_shards(n, num_ranks)
    assert len(shards) == num_ranks
    assert torch.equal(torch.cat([shard_indices(s) for s in shards]), torch.arange(n))
    sizes = shard_sizes(shards)
    assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("n", [0, 3, 7, 8, 50, 4093, 4096])
@pytest.mark.parametrize("num_ranks", [1, 2, 4])
def test_zigzag_pieces_and_permutation(n, num_ranks):
    shards = zigzag_shards(n, num_ranks)
    pieces = contiguous_shards(n, 2 * num_ranks)
    for i, ranges in enumerate(shards):
        assert ranges == [pieces[i], pieces[2 * num_ranks - 1 - i]]
    piece_sizes = [e - s for s, e in pieces]
    assert max(piece_sizes) - min(piece_sizes) <= 1  # remainder spread, empty pieces if n < 2P
    idx = torch.cat([shard_indices(r) for r in shards])
    assert torch.equal(idx.sort().values, torch.arange(n))  # a permutation of the chunk
    start_pos = 1000
    positions = start_pos + idx  # positions permute exactly like the tokens
    assert torch.equal(positions - start_pos, idx)


def test_causal_work_matches_brute_force():
    for num_cached in (0, 5):
        n = 23
        keys = torch.arange(n + num_cached)
        for ranges in ([(0, 23)], [(3, 9), (17, 20)], [(5, 5)]):
            pos = num_cached + shard_indices(ranges)
            brute = int(visibility_mask(pos, keys).sum())
            assert causal_work_pairs(ranges, num_cached) == brute


@pytest.mark.parametrize("num_ranks", [2, 4])
@pytest.mark.parametrize("n", [4096, 4093])
@pytest.mark.parametrize("num_cached", [0, 8192])
def test_zigzag_is_balanced(num_ranks, n, num_cached):
    work = causal_work_per_rank(zigzag_shards(n, num_ranks), num_cached)
    mean = sum(work) / num_ranks
    assert sum(work) == causal_work_pairs((0, n), num_cached)
    assert max(abs(w - mean) for w in work) <= 0.05 * mean


@pytest.mark.parametrize("num_ranks, min_ratio", [(2, 2.5), (4, 6.0)])
def test_contiguous_is_unbalanced(num_ranks, min_ratio):
    work = causal_work_per_rank(contiguous_shards(4096, num_ranks))
    # last rank vs first: ~3x at P=2, ~7x at P=4 (USP's figure)
    assert work[-1] / work[0] >= min_ratio
    mean = sum(work) / num_ranks
    assert max(work) > 1.4 * mean
