"""Ulysses (all-to-all) sequence-parallel attention via DeepSpeed's ``DistributedAttention``.

Input is sequence-sharded (any sharding, e.g. zigzag): rank r holds tokens with positions
``q_pos_per_rank[r]``, their q [T_r, Hq, D] and k/v [T_r, Hkv, D]; a whole prompt with no cached
KV (keys = the same tokens). DeepSpeed all-to-alls q, k, v so that each rank holds EVERY token for
a subset of heads (the gathered sequence is the rank shards concatenated in rank order), runs our
local attention on it, and all-to-alls the output back to sequence sharding.

Exactness details:
  * DeepSpeed needs the same token count on every rank: shards are padded to the longest one.
    Padding tokens get positions above every real position, so no real query sees them.
  * The local attention sorts the gathered tokens by position (the causal fast path of
    ``attention``) and returns ``[out | lse]`` as fp32 [T, h, D+1], so the LSE travels back
    with the output through DeepSpeed's output all-to-all and is exact (no bf16 LSE).
  * Head counts not divisible by P (e.g. 9 q / 3 kv heads on 2 ranks): DeepSpeed partitions by kv
    groups ([6, 3] q heads, [2, 1] kv heads) and reads the SP rank from
    ``deepspeed.utils.groups.mpu``; we register an mpu view of ``comm`` for the duration of the call
    and restore the previous value. P must not exceed the number of kv heads.

Bytes: DeepSpeed's all-to-alls bypass ``Comm``; we count them from shapes under "ulysses_a2a"
(``Comm.count``): per rank, the padded rows of the heads it sends away for q, k and v, plus the
fp32 [out | lse] rows of its heads for the other ranks' tokens (≈ (2 + 2g)·N·d/P·e + N·d/P·4).
"""

from __future__ import annotations

import contextlib
import importlib
from typing import Callable, Sequence

import torch
import torch.distributed as dist
from csps.kernels import attention
from csps.parallel.comm import Comm


class _SeqParallelMpu:
    """The sequence-parallel 'mpu' DeepSpeed looks up in ``deepspeed.utils.groups.mpu``."""

    def __init__(self, comm: Comm) -> None:
        self._comm = comm

    def get_sequence_parallel_group(self):
        return self._comm.process_group

    def get_sequence_parallel_rank(self) -> int:
        return self._comm.rank

    def get_sequence_parallel_world_size(self) -> int:
        return self._comm.size


class _GatheredAttention(torch.nn.Module):
    """DeepSpeed's local attention: all tokens, a subset of heads, seq-first layout."""

    def __init__(self, positions: torch.Tensor, attn_fn: Callable, scale, sliding_window) -> None:
        super().__init__()
        self.order = torch.argsort(positions)  # sorted positions hit the causal fast path
        self.positions = positions[self.order]
        self.attn_fn, self.scale, self.sliding_window = attn_fn, scale, sliding_window

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        # q: [T, 1, h, D], k/v: [T, 1, hkv, D] -> [T, 1, h, D+1] fp32 ([out | lse])
        o, l = self.attn_fn(
            q[self.order, 0], k[self.order, 0], v[self.order, 0], self.positions, self.positions,
            scale=self.scale, sliding_window=self.sliding_window,
        )
        packed = torch.empty(q.shape[0], q.shape[2], q.shape[3] + 1, dtype=torch.float32)
        packed[self.order] = torch.cat([o.float(), l[..., None]], dim=-1)
        return packed[:, None]


@contextlib.contextmanager
def _deepspeed_sp(comm: Comm):
    """Initialize deepspeed.comm over the existing torch.distributed world; register the SP mpu."""
    import deepspeed.comm as ds_dist
    from deepspeed.utils import groups as ds_groups

    if not ds_dist.is_initialized():
        # DeepSpeed's TorchBackend JIT-compiles a shared-memory all-reduce op on construction
        # (~60 s the first time on a machine). Ulysses only uses all_to_all_single: skip the build.
        ds_torch = importlib.import_module("deepspeed.comm.torch")  # not deepspeed.comm's `torch`

        saved_build = getattr(ds_torch, "build_shm_op", None)
        if saved_build is not None:
            ds_torch.build_shm_op = lambda: None
        try:
            ds_dist.init_distributed(dist_backend=dist.get_backend(), verbose=False)
        finally:
            if saved_build is not None:
                ds_torch.build_shm_op = saved_build
    saved_mpu = ds_groups.mpu
    ds_groups.mpu = _SeqParallelMpu(comm)
    try:
        yield
    finally:
        ds_groups.mpu = saved_mpu


def ulysses_head_split(num_heads: int, num_kv_heads: int, num_ranks: int) -> list[int]:
    """Heads per rank after DeepSpeed's all-to-all (kv-group aligned when uneven)."""
    if num_kv_heads % num_ranks == 0:
        return [num_heads // num_ranks] * num_ranks
    from deepspeed.module_inject.tp_shard import AutoTPMeta, get_shard_size_list

    return get_shard_size_list(num_heads, num_ranks, AutoTPMeta(num_kv_heads=num_kv_heads))


def ulysses_bytes(
    t_max: int, num_q_heads: int, num_kv_heads: int, head_dim: int, elem_bytes: int, rank: int, num_ranks: int
) -> int:
    """Bytes rank ``rank`` sends in one Ulysses attention (3 input all-to-alls + 1 output)."""
    qh = ulysses_head_split(num_q_heads, num_kv_heads, num_ranks)[rank]
    kvh = ulysses_head_split(num_kv_heads, num_kv_heads, num_ranks)[rank]
    qkv = t_max * head_dim * elem_bytes * ((num_q_heads - qh) + 2 * (num_kv_heads - kvh))
    out = (num_ranks - 1) * t_max * qh * (head_dim + 1) * 4
    return qkv + out


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos_per_rank: Sequence[torch.Tensor],
    comm: Comm,
    scale: float | None = None,
    sliding_window: int | None = None,
    attn_fn: Callable = attention,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-prompt attention of sequence-sharded q/k/v through DeepSpeed Ulysses.

    q: [T_r, Hq, D], k/v: [T_r, Hkv, D] for this rank's tokens, at positions
    q_pos_per_rank[comm.rank] ([T_r] int64); every rank passes every rank's positions.
    Returns out [T_r, Hq, D] in q's dtype, lse [T_r, Hq] fp32. Collective over ``comm``.
    """
    num_ranks, me = comm.size, comm.rank
    pos = q_pos_per_rank[me]
    if num_ranks == 1:
        return attn_fn(q, k, v, pos, pos, scale=scale, sliding_window=sliding_window)
    tq, hq, d = q.shape
    hkv = k.shape[1]
    if hkv < num_ranks:
        raise ValueError(f"Ulysses needs at least one kv head per rank ({hkv} kv heads, {num_ranks} ranks)")
    if v.shape[2] != d:
        raise ValueError("Ulysses packs [out | lse]: v must have q's head dim")
    from deepspeed.sequence.layer import DistributedAttention

    t_max = max(int(p.shape[0]) for p in q_pos_per_rank)
    if t_max == 0:
        return q.new_zeros(q.shape), torch.full((tq, hq), float("-inf"))
    pad_start = 1 + max(int(p.max()) for p in q_pos_per_rank if p.numel())
    padded_pos = []  # every rank's positions padded to t_max, pads above every real position
    for p in q_pos_per_rank:
        pads = torch.arange(pad_start, pad_start + t_max - p.shape[0], dtype=torch.int64)
        padded_pos.append(torch.cat([p, pads]))
        pad_start += t_max - p.shape[0]

    def pad(x: torch.Tensor) -> torch.Tensor:  # [T_r, H, D] -> [t_max, 1, H, D]
        return torch.cat([x, x.new_zeros(t_max - tq, *x.shape[1:])])[:, None].contiguous()

    local = _GatheredAttention(torch.cat(padded_pos), attn_fn, scale, sliding_window)
    with torch.no_grad(), _deepspeed_sp(comm):
        dattn = DistributedAttention(
            local, comm.process_group, scatter_idx=2, gather_idx=0, num_kv_heads=hkv
        )
        res = dattn(pad(q), pad(k), pad(v), batch_dim_idx=1)  # [t_max, 1, Hq, D+1] fp32
    comm.count("ulysses_a2a", ulysses_bytes(t_max, hq, hkv, d, q.element_size(), me, num_ranks))
    res = res[:tq, 0]
    return res[..., :d].to(q.dtype), res[..., d].contiguous()
