"""The step plan: what one SP rank computes in one step (plain data, msgpack-able, no torch).

Rank 0 builds one plan per SP rank from the scheduler output (``PlanBuilder``) and sends each SP
rank (all TP ranks of it) its own. A plan carries what changed, never what the ranks already know:
the new tokens and their positions, the KV blocks allocated since the last plan, the requests whose
KV was freed (finished, aborted, preempted). Each rank keeps its own block tables
(``csps.engine.block_tables``). So a plan's bytes and the Python work to build and read it grow with the batch,
never with the context.

A sequence-parallel chunk names its positions ``[start, end)``: every rank derives every rank's
share of it from the zigzag placement (``kv_placement``), so no other rank's tokens or blocks travel.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from csps.core import kv_placement as kp

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
    """One sequence's work on this rank in one step."""

    req_id: str
    token_ids: list[int]  # the new tokens this rank computes
    pos: Ranges  # their positions
    new_block_ids: list[int]  # KV blocks this rank allocated for the sequence since its last plan
    num_kv_before: int  # local KV tokens cached before this step; new ones follow in slot order
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
    """A sequence-parallel chunk: positions [start, end) spread zigzag over the SP ranks."""

    req_id: str
    start: int
    end: int
    mine: SeqWork  # this rank's share
    exchange: str = "pass_kv"  # pass_kv | pass_q | ulysses (prefill); decode is always pass_q
    is_decode: bool = False

    def shares(self, sp: int, granule: int) -> list[RankShare]:
        """Every SP rank's share of the chunk (derived, the same on every rank)."""
        ranges = kp.ranges_per_rank(self.start, self.end, sp, granule)
        return [RankShare(ranges[r], kp.count_before(self.start, r, sp, granule)) for r in range(sp)]


@dataclass(frozen=True)
class RankShare:
    pos: Ranges  # positions this rank computes
    num_kv_before: int  # its KV tokens of the sequence before this step

    @property
    def num_tokens(self) -> int:
        return ranges_len(self.pos)

    @property
    def num_kv(self) -> int:
        return self.num_kv_before + self.num_tokens


@dataclass
class StepPlan:
    step_id: int
    seqs: list[SeqWork] = field(default_factory=list)  # single-rank sequences of this rank
    sp_seqs: list[SPSeqWork] = field(default_factory=list)
    free_req_ids: list[str] = field(default_factory=list)  # drop these block tables before the step
    shutdown: bool = False

    @property
    def empty(self) -> bool:
        return not self.seqs and not self.sp_seqs

    def to_bytes(self) -> bytes:
        import msgpack  # only a multi-rank world serializes plans

        return msgpack.packb(asdict(self), use_bin_type=True)

    @staticmethod
    def from_bytes(data: bytes) -> StepPlan:
        import msgpack

        d = msgpack.unpackb(data, raw=False, strict_map_key=False)

        def seq(x: dict) -> SeqWork:
            x["pos"] = [tuple(r) for r in x["pos"]]
            return SeqWork(**x)

        return StepPlan(
            step_id=d["step_id"],
            seqs=[seq(s) for s in d["seqs"]],
            sp_seqs=[SPSeqWork(req_id=s["req_id"], start=s["start"], end=s["end"], mine=seq(s["mine"]),
                               exchange=s["exchange"], is_decode=s["is_decode"]) for s in d["sp_seqs"]],
            free_req_ids=d["free_req_ids"],
            shutdown=d["shutdown"],
        )
