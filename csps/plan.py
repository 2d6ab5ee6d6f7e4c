"""The step plan: what each rank computes in one step (plain data, msgpack-able).

Rank 0 builds it from the scheduler output and the KV manager's block tables, broadcasts it,
and every rank runs it SPMD. Positions are given as ``(start, end)`` ranges so a zigzag shard of
a sequence-parallel chunk stays small on the wire.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import msgpack

Ranges = list[tuple[int, int]]


def ranges_len(r: Ranges) -> int:
    return sum(e - s for s, e in r)


def ranges_to_list(r: Ranges) -> list[int]:
    out: list[int] = []
    for s, e in r:
        out.extend(range(s, e))
    return out


@dataclass
class SeqWork:
    """One sequence's work on one rank in one step."""

    req_id: str
    token_ids: list[int]  # the new tokens this rank computes
    pos: Ranges  # their positions
    block_ids: list[int]  # this rank's KV blocks for the sequence (after this step)
    num_kv_before: int  # local KV tokens cached before this step; new ones follow in slot order
    kv_pos: Ranges | None = None  # positions of all local KV tokens (None: 0..num_kv contiguous)
    sp_layout: tuple[int, int, int] | None = None  # (sp, rank, granule): zigzag KV placement
    is_decode: bool = False
    sample: bool = False  # this rank returns the hidden state of the last new token

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_kv(self) -> int:
        return self.num_kv_before + self.num_tokens


@dataclass
class SPSeqWork:
    """A sequence-parallel sequence: every SP rank's share, known to all of them."""

    req_id: str
    per_rank: list[SeqWork]  # index = SP rank
    exchange: str = "pass_kv"  # pass_kv | pass_q | ulysses (prefill); decode is always pass_q
    owner_rank: int = 0


@dataclass
class StepPlan:
    step_id: int
    seqs: list[SeqWork] = field(default_factory=list)  # single-rank sequences (this rank's)
    per_rank: dict[int, list[SeqWork]] = field(default_factory=dict)  # rank -> its local seqs
    sp_seqs: list[SPSeqWork] = field(default_factory=list)
    free_req_ids: list[str] = field(default_factory=list)
    shutdown: bool = False

    def to_bytes(self) -> bytes:
        return msgpack.packb(asdict(self), use_bin_type=True)

    @staticmethod
    def from_bytes(data: bytes) -> StepPlan:
        d = msgpack.unpackb(data, raw=False, strict_map_key=False)

        def seq(x: dict) -> SeqWork:
            x["pos"] = [tuple(r) for r in x["pos"]]
            if x["kv_pos"] is not None:
                x["kv_pos"] = [tuple(r) for r in x["kv_pos"]]
            if x["sp_layout"] is not None:
                x["sp_layout"] = tuple(x["sp_layout"])
            return SeqWork(**x)

        return StepPlan(
            step_id=d["step_id"],
            seqs=[seq(s) for s in d["seqs"]],
            per_rank={int(r): [seq(s) for s in v] for r, v in d["per_rank"].items()},
            sp_seqs=[SPSeqWork(req_id=s["req_id"], per_rank=[seq(w) for w in s["per_rank"]],
                               exchange=s["exchange"], owner_rank=s["owner_rank"]) for s in d["sp_seqs"]],
            free_req_ids=d["free_req_ids"],
            shutdown=d["shutdown"],
        )
