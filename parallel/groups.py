"""Process groups: one world of W = SP x TP ranks, passed around explicitly (no module globals).

Layout (Megatron-style):
  * TP groups are contiguous ranks: world rank w has ``tp_rank = w % tp`` and belongs to the TP
    group ``[s*tp, ..., s*tp + tp - 1]`` with ``s = w // tp``.
  * SP groups are strided: the ranks holding the same head shard (same ``tp_rank``),
    ``[t, t + tp, t + 2*tp, ...]``; ``sp_rank = w // tp``. The SP ring runs inside one SP group.

``new_group`` is collective over the WORLD: every rank creates every group, in the same order
(all TP groups, then all SP groups), and keeps the ones it belongs to. A group of size 1 is not
created (its Comm is local), and a group that spans the whole world reuses the default group.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from csps.parallel.comm import Comm

DEFAULT_TIMEOUT_S = 600.0


@dataclass(frozen=True)
class ParallelGroups:
    world_rank: int
    world_size: int
    sp: int
    tp: int
    sp_rank: int
    tp_rank: int
    world: Comm  # tensors (the default backend: NCCL on CUDA, gloo on CPU)
    sp_comm: Comm
    tp_comm: Comm
    control: Comm  # the world over gloo, on the CPU: step plans and per-step statistics (no device sync)


def init_distributed(backend: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[int, int]:
    """Initialize torch.distributed from env:// (MASTER_ADDR/PORT, RANK, WORLD_SIZE; torchrun style).

    backend: "gloo", "nccl" or "auto" (nccl when CUDA is available, else gloo). Does nothing if
    already initialized, and without WORLD_SIZE (or with WORLD_SIZE=1 and no MASTER_ADDR) stays a
    single process. Returns (rank, world_size). ``timeout_s`` bounds every collective and p2p op.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1 and "MASTER_ADDR" not in os.environ:
        return 0, 1
    if backend == "auto":
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"unknown backend {backend!r} (gloo | nccl | auto)")
    for var in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        if var not in os.environ:
            raise RuntimeError(f"init_distributed: {var} is not set (launch with torchrun or spawn)")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))  # this rank's GPU: cuda:LOCAL_RANK
    dist.init_process_group(
        backend,
        init_method="env://",
        rank=int(os.environ["RANK"]),
        world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s),
    )
    return dist.get_rank(), dist.get_world_size()


def sp_group_ranks(sp: int, tp: int) -> list[list[int]]:
    """The SP groups as lists of world ranks: group t holds ranks t, t+tp, ..."""
    return [[s * tp + t for s in range(sp)] for t in range(tp)]


def tp_group_ranks(sp: int, tp: int) -> list[list[int]]:
    """The TP groups as lists of world ranks: group s holds ranks s*tp .. s*tp+tp-1."""
    return [[s * tp + t for t in range(tp)] for s in range(sp)]


def _default_timeout() -> datetime.timedelta:
    try:  # the timeout the world was initialized with (gloo exposes it on the backend options)
        pg = dist.distributed_c10d._get_default_group()
        return pg._get_backend(torch.device("cpu")).options._timeout
    except Exception:  # noqa: BLE001 - private API; fall back to our default
        return datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)


def _make_comms(all_groups: list[list[int]], me: int, world_size: int, timeout, device: torch.device) -> Comm:
    """Create every group (collectively, same order on every rank); return the Comm holding ``me``."""
    mine = None
    for ranks in all_groups:
        if len(ranks) == 1:
            comm = Comm.single(me, device) if me in ranks else None
        elif len(ranks) == world_size:
            comm = Comm(None, ranks, device)
        else:
            pg = dist.new_group(ranks, timeout=timeout)
            comm = Comm(pg, ranks, device) if me in ranks else None
        if me in ranks:
            mine = comm
    assert mine is not None
    return mine


def build_groups(sp: int, tp: int, device: torch.device | str = "cpu") -> ParallelGroups:
    """Build the world, SP and TP Comms (tensors on ``device``) and the gloo control Comm. Call on every
    rank after ``init_distributed``.

    sp * tp must equal the world size (1 if torch.distributed is not initialized).
    """
    device = torch.device(device)
    initialized = dist.is_available() and dist.is_initialized()
    world_size = dist.get_world_size() if initialized else 1
    world_rank = dist.get_rank() if initialized else 0
    if sp < 1 or tp < 1 or sp * tp != world_size:
        raise ValueError(f"sp ({sp}) x tp ({tp}) must equal the world size ({world_size})")
    if world_size == 1:
        one = Comm.single(0, device)
        return ParallelGroups(0, 1, 1, 1, 0, 0, one, one, one, Comm.single())
    timeout = _default_timeout()
    tp_comm = _make_comms(tp_group_ranks(sp, tp), world_rank, world_size, timeout, device)
    sp_comm = _make_comms(sp_group_ranks(sp, tp), world_rank, world_size, timeout, device)
    everyone = list(range(world_size))
    if dist.get_backend() == "gloo":
        control = Comm(None, everyone)
    else:  # NCCL moves device tensors only: plans and statistics take a gloo group on the CPU
        control = Comm(dist.new_group(everyone, timeout=timeout, backend="gloo"), everyone)
    return ParallelGroups(
        world_rank=world_rank,
        world_size=world_size,
        sp=sp,
        tp=tp,
        sp_rank=world_rank // tp,
        tp_rank=world_rank % tp,
        world=Comm(None, everyone, device),
        sp_comm=sp_comm,
        tp_comm=tp_comm,
        control=control,
    )
