"""Helpers for the multi-process tests (tests/test_parallel_*.py).

The rank functions run in processes started by ``csps.parallel.spawn``; they must be module-level
functions of a test module. Every rank builds the same full tensors from a seed, takes its shard,
and returns plain numbers that the parent process asserts on.
"""

from __future__ import annotations

import torch
from csps.parallel import Comm

TOL = 1e-5  # fp32 tolerance against attention_ref
SPAWN_TIMEOUT_S = 60.0


def world_comm(world_size: int) -> Comm:
    return Comm(None, list(range(world_size)))


def rand(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def rand_qkv(seed: int, n_q: int, n_k: int, hq: int, hkv: int, d: int):
    """q: [n_q, hq, d], k/v: [n_k, hkv, d], fp32, deterministic."""
    return rand(seed, n_q, hq, d), rand(seed + 1, n_k, hkv, d), rand(seed + 2, n_k, hkv, d)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Max |a - b|, treating equal infinities as equal (lse of rows without keys)."""
    if a.numel() == 0:
        return 0.0
    same_inf = torch.isinf(a) & (a == b)
    diff = torch.where(same_inf, torch.zeros_like(a), (a.float() - b.float()).abs())
    return float(diff.nan_to_num(float("inf")).max())


def random_split(seed: int, n: int, num_ranks: int) -> list[torch.Tensor]:
    """Assign n tokens to ranks at random (uneven, possibly empty); indices in random order."""
    g = torch.Generator().manual_seed(seed)
    owner = torch.randint(0, num_ranks, (n,), generator=g)
    perm = torch.randperm(n, generator=g)
    return [perm[owner[perm] == r] for r in range(num_ranks)]
