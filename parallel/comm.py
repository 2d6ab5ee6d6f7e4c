"""Counted communication: the only module that calls torch.distributed collectives and p2p.

A ``Comm`` wraps one process group (or the world) plus the global ranks in it, in group-rank
order. Every method takes a ``kind`` string ("pass_kv", "pass_q", "pass_q_out", "tp_allreduce",
"plan", ...) and adds the bytes THIS rank sends to ``bytes_step[kind]`` and ``bytes_total[kind]``.
``reset_step()`` clears the per-step counters.

Byte counting rules (n = payload bytes, P = group size; a size-1 group moves and counts nothing):
  * ``ring_send_recv``: the bytes of the tensors this rank sends to the next rank.
  * ``all_to_all``: the bytes of the tensors sent to OTHER ranks (the slice a rank keeps for
    itself is a local copy and is not counted).
  * ``all_reduce``: the ring all-reduce volume ``2 * (P - 1) * n // P`` (integer division), what
    a bandwidth-optimal reduce-scatter + all-gather sends per rank, whatever gloo/NCCL really do.
  * ``broadcast``: the source counts ``(P - 1) * n`` (one copy per receiver, the flat model);
    receivers count 0.
  * ``scatter_bytes``: the source sends each other rank an 8-byte length, then that rank's payload
    (if non-empty): it counts ``sum(8 + len)`` over the other ranks; receivers count 0.
  * ``gather_to``: each non-destination rank counts its payload, plus ``8 * ndim`` bytes of shape
    header when the caller does not pass ``shapes``; the destination counts 0.
  * ``count(kind, n)``: traffic that bypasses this module and is counted by its caller from shapes.
    The one user is Ulysses (``ulysses.py``): DeepSpeed runs its own all-to-alls.

Failure: p2p and collectives raise (gloo: after the process group's timeout, set at
``init_process_group``) rather than hang forever; a ``RingHandle.wait`` waits every outstanding
op before re-raising the first error, so no op is left in flight.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.distributed as dist

ShapeDtype = tuple[Sequence[int], torch.dtype]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _wait_all(works: list) -> None:
    """Wait for every op; re-raise the first failure after all were waited (drained)."""
    first_error: BaseException | None = None
    for w in works:
        try:
            w.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            first_error = first_error or e
    if first_error is not None:
        raise first_error


class RingHandle:
    """An in-flight ring exchange. ``wait()`` returns the received tensors (once)."""

    def __init__(self, works: list, recv: list[torch.Tensor]) -> None:
        self._works = works
        self._recv = recv

    def wait(self) -> list[torch.Tensor]:
        works, self._works = self._works, []
        _wait_all(works)
        return self._recv


class Comm:
    """Counted communication over one process group.

    group: a ProcessGroup, or None for the default (world) group. ranks: the global ranks in the
    group, in group-rank order. ``rank`` is this process's index in ``ranks``; ``size`` is
    ``len(ranks)``. ``device``: where this group's tensors live (the CPU for gloo, the rank's GPU for
    NCCL); receive buffers are made there. A size-1 Comm never touches torch.distributed (it may be
    built without it).
    """

    def __init__(self, group: dist.ProcessGroup | None, ranks: Sequence[int],
                 device: torch.device | str = "cpu") -> None:
        self.group = group
        self.device = torch.device(device)
        self.ranks = [int(r) for r in ranks]
        self.size = len(self.ranks)
        if self.size == 0:
            raise ValueError("a Comm needs at least one rank")
        if self.size == 1:
            self.rank = 0
        else:
            me = dist.get_rank()
            if me not in self.ranks:
                raise ValueError(f"global rank {me} is not in this group's ranks {self.ranks}")
            self.rank = self.ranks.index(me)
        self.bytes_total: dict[str, int] = {}
        self.bytes_step: dict[str, int] = {}

    @classmethod
    def single(cls, global_rank: int = 0, device: torch.device | str = "cpu") -> "Comm":
        """A size-1 Comm (of global rank ``global_rank``): every operation is a local no-op."""
        return cls(None, [global_rank], device)

    @property
    def process_group(self) -> dist.ProcessGroup | None:
        """The torch ProcessGroup (the WORLD group object when built with None)."""
        return dist.group.WORLD if self.group is None else self.group

    def __repr__(self) -> str:
        return f"Comm(rank={self.rank}, size={self.size}, ranks={self.ranks})"

    # -- counters -------------------------------------------------------------------------------

    def count(self, kind: str, num_bytes: int) -> None:
        """Add bytes sent by this rank under ``kind`` (also used for traffic outside this module)."""
        self.bytes_step[kind] = self.bytes_step.get(kind, 0) + int(num_bytes)
        self.bytes_total[kind] = self.bytes_total.get(kind, 0) + int(num_bytes)

    def reset_step(self) -> None:
        self.bytes_step = {}

    # -- point to point ---------------------------------------------------------------------------

    def _global(self, group_rank: int) -> int:
        return self.ranks[group_rank % self.size]

    def ring_send_recv(
        self, send: Sequence[torch.Tensor], recv_shapes_dtypes: Sequence[ShapeDtype], kind: str
    ) -> RingHandle:
        """Send ``send`` to the next rank and receive tensors of the given shapes from the previous.

        Asynchronous (one ``batch_isend_irecv``); call ``.wait()`` on the handle for the received
        tensors. Zero-element tensors are not put on the wire (both sides know the shapes).
        On a size-1 group the "received" tensors are the sent ones.
        """
        if self.size == 1:
            return RingHandle([], list(send))
        nxt, prv = self._global(self.rank + 1), self._global(self.rank - 1)
        ops, recv = [], []
        for t in send:
            if t.numel():
                ops.append(dist.P2POp(dist.isend, t.contiguous(), nxt, self.group))
                self.count(kind, _nbytes(t))
        for shape, dtype in recv_shapes_dtypes:
            buf = torch.empty(tuple(shape), dtype=dtype, device=self.device)
            recv.append(buf)
            if buf.numel():
                ops.append(dist.P2POp(dist.irecv, buf, prv, self.group))
        works = dist.batch_isend_irecv(ops) if ops else []
        return RingHandle(works, recv)

    # -- collectives ------------------------------------------------------------------------------

    def all_to_all(
        self, tensors_per_dest: Sequence[torch.Tensor], recv_shapes: Sequence[Sequence[int]], kind: str
    ) -> list[torch.Tensor]:
        """Variable-size all-to-all: send ``tensors_per_dest[j]`` to group rank j, receive from each.

        All tensors share one dtype (pack mixed payloads as uint8 views). ``recv_shapes[j]`` is the
        shape of the tensor coming from rank j. Returns one tensor per source rank.
        """
        if len(tensors_per_dest) != self.size or len(recv_shapes) != self.size:
            raise ValueError(f"all_to_all needs {self.size} tensors and shapes, one per rank")
        if self.size == 1:
            return [tensors_per_dest[0]]
        dtype = tensors_per_dest[0].dtype
        if any(t.dtype != dtype for t in tensors_per_dest):
            raise ValueError("all_to_all: tensors must share one dtype (pack mixed payloads as uint8)")
        send_numels = [t.numel() for t in tensors_per_dest]
        recv_numels = [_numel(s) for s in recv_shapes]
        flat_in = torch.cat([t.reshape(-1) for t in tensors_per_dest])
        flat_out = torch.empty(sum(recv_numels), dtype=dtype, device=flat_in.device)
        self.count(kind, (flat_in.numel() - send_numels[self.rank]) * flat_in.element_size())
        dist.all_to_all_single(flat_out, flat_in, recv_numels, send_numels, group=self.group)
        return [p.view(tuple(s)) for p, s in zip(flat_out.split(recv_numels), recv_shapes)]

    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor:
        """Sum ``t`` over the group, in place; returns ``t``."""
        if self.size == 1:
            return t
        self.count(kind, 2 * (self.size - 1) * _nbytes(t) // self.size)
        if t.is_contiguous():
            dist.all_reduce(t, group=self.group)
        else:
            tmp = t.contiguous()
            dist.all_reduce(tmp, group=self.group)
            t.copy_(tmp)
        return t

    def broadcast(self, t: torch.Tensor, src: int, kind: str) -> torch.Tensor:
        """Broadcast ``t`` (contiguous, same shape everywhere) from group rank ``src``, in place."""
        if self.size == 1:
            return t
        if self.rank == src:
            self.count(kind, (self.size - 1) * _nbytes(t))
        dist.broadcast(t, self._global(src), group=self.group)
        return t

    def scatter_bytes(self, blobs: Sequence[bytes] | None, src: int, kind: str) -> bytes:
        """Send group rank r the byte string ``blobs[r]`` from ``src`` (others pass None); returns this
        rank's. Each rank receives only its own (a length, then the bytes, point to point)."""
        if self.size == 1:
            return bytes(blobs[0])
        if self.rank == src:
            if blobs is None or len(blobs) != self.size:
                raise ValueError(f"scatter_bytes: the source rank must pass {self.size} byte strings")
            works, keep = [], []
            for r in range(self.size):
                if r == src:
                    continue
                length = torch.tensor([len(blobs[r])], dtype=torch.int64, device=self.device)
                keep.append(length)
                works.append(dist.isend(length, self._global(r), group=self.group))
                self.count(kind, _nbytes(length))
                if blobs[r]:
                    buf = torch.frombuffer(bytearray(blobs[r]), dtype=torch.uint8).to(self.device)
                    keep.append(buf)
                    works.append(dist.isend(buf, self._global(r), group=self.group))
                    self.count(kind, len(blobs[r]))
            _wait_all(works)
            return bytes(blobs[src])
        length = torch.empty(1, dtype=torch.int64, device=self.device)
        dist.recv(length, self._global(src), group=self.group)
        num_bytes = int(length.item())
        if num_bytes == 0:
            return b""
        buf = torch.empty(num_bytes, dtype=torch.uint8, device=self.device)
        dist.recv(buf, self._global(src), group=self.group)
        return buf.cpu().numpy().tobytes()

    def gather_to(
        self,
        t: torch.Tensor,
        dst: int,
        kind: str,
        shapes: Sequence[Sequence[int]] | None = None,
    ) -> list[torch.Tensor] | None:
        """Gather variable-size tensors (same dtype and ndim everywhere) to group rank ``dst``.

        Returns the list of every rank's tensor (index = group rank) on ``dst``, None elsewhere.
        Without ``shapes`` each rank first sends its shape (``8 * ndim`` bytes) to ``dst``; with them
        (every rank's shape on ``dst``, anything but None elsewhere) nothing but the payloads moves.
        """
        if self.size == 1:
            return [t]
        dst_global = self._global(dst)
        if self.rank != dst:
            works = []
            if shapes is None:
                header = torch.tensor(list(t.shape), dtype=torch.int64, device=self.device)
                self.count(kind, _nbytes(header))
                works.append(dist.isend(header, dst_global, group=self.group))
            if t.numel():
                self.count(kind, _nbytes(t))
                works.append(dist.isend(t.contiguous(), dst_global, group=self.group))
            _wait_all(works)
            return None
        others = [r for r in range(self.size) if r != dst]
        if shapes is None:
            headers = {r: torch.empty(t.dim(), dtype=torch.int64, device=self.device) for r in others}
            _wait_all([dist.irecv(headers[r], self._global(r), group=self.group) for r in others])
            shapes = [t.shape if r == dst else headers[r].tolist() for r in range(self.size)]
        out = [t if r == dst else torch.empty(tuple(shapes[r]), dtype=t.dtype, device=t.device)
               for r in range(self.size)]
        _wait_all([
            dist.irecv(out[r], self._global(r), group=self.group) for r in others if out[r].numel()
        ])
        return out

    def barrier(self) -> None:
        if self.size > 1:
            dist.barrier(group=self.group)


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n
