"""Comm (counted collectives and p2p), group layout, and spawn's failure handling."""

import time

import pytest
import torch
import torch.distributed as dist
from _dist import SPAWN_TIMEOUT_S, world_comm
from csps.parallel import Comm, SpawnError, SpawnTimeout, build_groups, spawn


def test_single_comm_is_a_local_noop():
    comm = Comm.single()
    t = torch.arange(4.0)
    assert comm.rank == 0 and comm.size == 1
    assert comm.ring_send_recv([t], [((4,), torch.float32)], "pass_kv").wait()[0] is t
    assert comm.all_to_all([t], [(4,)], "pass_q")[0] is t
    assert comm.all_reduce(t, "tp_allreduce") is t and torch.equal(t, torch.arange(4.0))
    assert comm.broadcast(t, 0, "plan") is t
    assert comm.scatter_bytes([b"plan"], 0, "plan") == b"plan"
    assert comm.gather_to(t, 0, "plan")[0] is t
    comm.barrier()
    assert comm.bytes_total == {} and not dist.is_initialized()


def _comm_ops(rank, world_size):
    comm = world_comm(world_size)
    p = world_size
    out = {}
    # ring: rank r sends r+1 rows (and an empty tensor) to r+1; receives from r-1.
    prev = (rank - 1) % p
    send = [torch.full((rank + 1, 3), float(rank)), torch.zeros(0, 3)]
    shapes = [((prev + 1, 3), torch.float32), ((0, 3), torch.float32)]
    recv = comm.ring_send_recv(send, shapes, "pass_kv").wait()
    expected = torch.full((prev + 1, 3), float(prev))
    out["ring_ok"] = torch.equal(recv[0], expected) and recv[1].shape == (0, 3)
    out["ring_bytes"] = comm.bytes_step["pass_kv"]
    # all_to_all: rank r sends (r + j) % 3 elements to rank j (some zero) with value 10 r + j.
    sends = [torch.full(((rank + j) % 3,), float(10 * rank + j)) for j in range(p)]
    got = comm.all_to_all(sends, [((j + rank) % 3,) for j in range(p)], "pass_q")
    out["a2a_ok"] = all(
        torch.equal(got[j], torch.full(((j + rank) % 3,), float(10 * j + rank))) for j in range(p)
    )
    out["a2a_bytes"] = comm.bytes_step["pass_q"]
    # all_reduce
    t = torch.full((5, 2), float(rank + 1))
    comm.all_reduce(t, "tp_allreduce")
    out["allreduce_ok"] = torch.equal(t, torch.full((5, 2), float(p * (p + 1) // 2)))
    out["allreduce_bytes"] = comm.bytes_step["tp_allreduce"]
    # broadcast from the last rank; scatter_bytes: each rank its own blob, one of them empty
    b = torch.arange(6.0) if rank == p - 1 else torch.zeros(6)
    comm.broadcast(b, p - 1, "bcast")
    out["bcast_ok"] = torch.equal(b, torch.arange(6.0))
    out["bcast_bytes"] = comm.bytes_step.get("bcast", 0)
    blobs = [b"step plan \x00\xff" * (r + 1) if r != 1 else b"" for r in range(p)]
    blob = comm.scatter_bytes(blobs if rank == 0 else None, 0, "plan")
    out["bytes_ok"] = blob == blobs[rank]
    out["plan_bytes"] = comm.bytes_step.get("plan", 0)
    # gather_to rank 1, variable sizes, with and without known shapes
    mine = torch.full((rank, 2), float(rank))
    g1 = comm.gather_to(mine, 1, "gather")
    g2 = comm.gather_to(mine, 1, "gather", shapes=[(r, 2) for r in range(p)])
    if rank == 1:
        out["gather_ok"] = all(
            torch.equal(g[r], torch.full((r, 2), float(r))) for g in (g1, g2) for r in range(p)
        )
    else:
        out["gather_ok"] = g1 is None and g2 is None
    out["gather_bytes"] = comm.bytes_step.get("gather", 0)
    comm.barrier()
    out["total_equals_step"] = comm.bytes_total == comm.bytes_step
    comm.reset_step()
    out["reset"] = comm.bytes_step == {}
    return out


@pytest.mark.parametrize("world_size", [2, 3])
def test_comm_ops_and_byte_counts(world_size):
    p, e = world_size, 4
    results = spawn(_comm_ops, world_size, timeout_s=SPAWN_TIMEOUT_S)
    for r, out in enumerate(results):
        for key in ("ring_ok", "a2a_ok", "allreduce_ok", "bcast_ok", "bytes_ok", "gather_ok",
                    "total_equals_step", "reset"):
            assert out[key], (r, key)
        assert out["ring_bytes"] == (r + 1) * 3 * e
        assert out["a2a_bytes"] == sum((r + j) % 3 for j in range(p) if j != r) * e
        assert out["allreduce_bytes"] == 2 * (p - 1) * 10 * e // p
        assert out["bcast_bytes"] == ((p - 1) * 6 * e if r == p - 1 else 0)
        payload = len(b"step plan \x00\xff")  # rank r gets r + 1 copies, rank 1 none; 8 bytes of length each
        assert out["plan_bytes"] == (sum(8 + (j + 1) * payload * (j != 1) for j in range(1, p)) if r == 0 else 0)
        header = 8 * 2  # shape of a 2-d tensor, first gather only
        assert out["gather_bytes"] == (0 if r == 1 else 2 * (r * 2 * e) + header)


def _groups(rank, world_size):
    seen = {}
    for sp, tp in ((2, 2), (4, 1), (1, 4)):
        g = build_groups(sp, tp)
        sp_sum = g.sp_comm.all_reduce(torch.tensor([float(rank)]), "probe")
        tp_sum = g.tp_comm.all_reduce(torch.tensor([float(rank)]), "probe")
        seen[(sp, tp)] = dict(
            sp_rank=g.sp_rank, tp_rank=g.tp_rank, sp_comm_rank=g.sp_comm.rank,
            tp_comm_rank=g.tp_comm.rank, sp_ranks=g.sp_comm.ranks, tp_ranks=g.tp_comm.ranks,
            sp_sum=float(sp_sum), tp_sum=float(tp_sum), world=g.world.size,
        )
    return seen


def test_groups_layout():
    results = spawn(_groups, 4, timeout_s=SPAWN_TIMEOUT_S)
    for w, seen in enumerate(results):
        for (sp, tp), g in seen.items():
            tp_ranks = [w // tp * tp + t for t in range(tp)]  # contiguous
            sp_ranks = [s * tp + w % tp for s in range(sp)]  # strided: same head shard
            assert g["tp_ranks"] == tp_ranks and g["sp_ranks"] == sp_ranks
            assert g["sp_rank"] == g["sp_comm_rank"] == w // tp
            assert g["tp_rank"] == g["tp_comm_rank"] == w % tp
            assert g["sp_sum"] == sum(sp_ranks) and g["tp_sum"] == sum(tp_ranks)
            assert g["world"] == 4


def _raise_mid_collective(rank, world_size):
    comm = world_comm(world_size)
    comm.all_reduce(torch.ones(3), "probe")  # one collective that succeeds
    if rank == 1:
        raise ValueError("injected failure on rank 1")
    comm.all_reduce(torch.ones(3), "probe")  # rank 0 waits here for a peer that is gone
    return rank


def test_rank_failure_raises_one_clear_error():
    start = time.time()
    with pytest.raises(SpawnError, match=r"rank 1 of 2 failed: ValueError: injected failure on rank 1"):
        spawn(_raise_mid_collective, 2, timeout_s=SPAWN_TIMEOUT_S)
    assert time.time() - start < 20


def _hang(rank, world_size):
    if rank == 0:
        dist.recv(torch.zeros(1), src=1)  # never sent
    else:
        time.sleep(60)


def test_hang_raises_timeout_with_stacks():
    start = time.time()
    with pytest.raises(SpawnTimeout) as info:
        spawn(_hang, 2, timeout_s=2)
    assert time.time() - start < 15
    msg = str(info.value)
    assert "did not finish within 2 s" in msg
    assert "_hang" in msg  # the faulthandler dump names the hung function
