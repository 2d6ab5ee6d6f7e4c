"""The engine over a world of SP × TP ranks.

Rank 0 (this process) schedules, builds each step's plan for every rank, broadcasts it (msgpack
bytes over the counted ``Comm``), runs its own share, and gathers the hidden states of the tokens
to sample plus every rank's byte counters. Ranks 1..W-1 (child processes, or torchrun peers) run
``rank_loop``: receive a plan, run it, send results, until a shutdown plan. A rank that fails
reports its error before exiting; rank 0 raises one clear ``CspsError`` naming it.
"""

from __future__ import annotations

import logging
import os
import weakref

import torch

from csps import kv_placement as kp
from csps.engine import Engine
from csps.errors import CspsError
from csps.exchange import ExchangePolicy, measure_link
from csps.plan import SeqWork, SPSeqWork, StepPlan
from csps.rank_runtime import RankRuntime, sample_order
from csps.scheduler import SchedulerOutput
from csps.weights import SharedWeights

log = logging.getLogger("csps.dist_engine")

BYTE_KINDS = ("plan", "sample", "pass_kv", "pass_q", "pass_q_pos", "pass_q_out", "ulysses_a2a",
              "tp_allreduce")


def rank_loop(rt: RankRuntime) -> None:
    """Ranks 1..W-1: execute plans until told to stop."""
    world = rt.groups.world
    while True:
        plan = StepPlan.from_bytes(world.broadcast_bytes(None, src=0, kind="plan"))
        if plan.shutdown:
            return
        hidden = rt.execute(plan)
        world.gather_to(hidden, dst=0, kind="sample")
        world.gather_to(rt.step_bytes_tensor(BYTE_KINDS), dst=0, kind="stats")


def is_torchrun_worker() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["RANK"]) != 0


def torchrun_worker_main(config, weights) -> None:
    """A non-zero rank launched by torchrun: join the rendezvous, serve plans, exit the process."""
    import sys

    from csps.engine import kv_pool_blocks
    from csps.parallel.groups import init_distributed

    check_layout(config, weights[0])
    init_distributed(config.parallel.backend)
    code = 0
    try:
        num_blocks = agree_num_blocks(kv_pool_blocks(config, weights[0]))
        child_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config, weights, num_blocks)
    except Exception as e:  # noqa: BLE001
        log.error("rank %s failed: %s", os.environ["RANK"], e)
        code = 1
    sys.exit(code)


def agree_num_blocks(num_blocks: int) -> int:
    """Under torchrun each rank sized its pool from its own free memory: take rank 0's size."""
    import torch.distributed as dist

    from csps.parallel.comm import Comm

    t = torch.tensor([num_blocks], dtype=torch.int64)
    Comm(None, list(range(dist.get_world_size()))).broadcast(t, src=0, kind="plan")
    return int(t[0])


def child_main(rank: int, world_size: int, config, weights, num_blocks: int) -> None:
    model_cfg, sd = weights
    if isinstance(sd, SharedWeights):
        sd = sd.state_dict()
    rt = RankRuntime(config, (model_cfg, sd), num_blocks)
    del weights
    rt.handshake()
    rank_loop(rt)
    rt.close()


def check_layout(config, model_cfg) -> None:
    """Refuse impossible layouts before any rank starts."""
    p = config.parallel
    if p.tp > model_cfg.num_heads:
        raise CspsError(f"--tp {p.tp} exceeds the model's {model_cfg.num_heads} attention heads")
    env_world = os.environ.get("WORLD_SIZE")
    if env_world is not None and int(env_world) != p.world_size:
        raise CspsError(f"--sp {p.sp} x --tp {p.tp} = {p.world_size} ranks, but torchrun started {env_world}")
    if p.sp_attn == "ulysses" and p.sp > 1:
        kv_local = -(-model_cfg.num_kv_heads // p.tp)
        if kv_local < p.sp:
            raise CspsError(f"--sp-attn ulysses needs at least one KV head per SP rank: {kv_local} KV heads "
                            f"per TP rank for --sp {p.sp}; use --sp-attn ring")
    cores = os.cpu_count() or 1
    if p.world_size > cores and not torch.cuda.is_available():
        log.warning("%d ranks on %d CPU cores: ranks will time-share the cores", p.world_size, cores)


class RankWorld:
    """The ranks an engine started, and how they are shut down. Owned by the engine through a
    ``weakref.finalize``, so dropping the engine, garbage collection or interpreter exit stop them
    (holds no reference to the engine itself)."""

    def __init__(self, rank_group, threads_before: int) -> None:
        self.rank_group = rank_group  # None under torchrun: the ranks are not ours to stop
        self.threads_before = threads_before
        self.world = None  # rank 0's world Comm, once the runtime is built
        self.dead: str | None = None

    def close(self) -> None:
        import torch.distributed as dist

        alive = self.rank_group is None or self.rank_group.alive()
        if not self.dead and alive and self.world is not None:
            try:
                self.world.broadcast_bytes(StepPlan(step_id=-1, shutdown=True).to_bytes(), src=0, kind="plan")
            except Exception:  # noqa: BLE001 - the ranks are stopped below either way
                pass
        if self.rank_group is not None:
            self.rank_group.stop(grace_s=5.0 if alive and not self.dead else 0.5)
        try:
            if dist.is_initialized():
                dist.destroy_process_group()
        except Exception:  # noqa: BLE001
            pass
        torch.set_num_threads(self.threads_before)
        self.world = None


def refuse_if_ranks_running() -> None:
    """A process holds one world of ranks at a time: fail at once, not after a rendezvous timeout."""
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # an engine dropped inside a reference cycle is stopped by its finalizer here
    if dist.is_available() and dist.is_initialized():
        raise CspsError("another engine's ranks are still running in this process: call shutdown() on it "
                        "(or use `with LLM(...) as llm:`) before starting a new sequence- or tensor-parallel "
                        "engine")


class DistEngine(Engine):
    def _start_runtime(self, model_cfg, state_dict, num_blocks: int) -> None:
        from csps.parallel.rank_group import RankGroup

        check_layout(self.config, model_cfg)
        world = self.config.parallel.world_size
        torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
        if not torchrun:
            refuse_if_ranks_running()
        self._world = RankWorld(None, torch.get_num_threads())
        self._finalizer = weakref.finalize(self, self._world.close)
        if not torchrun:
            shared = SharedWeights(state_dict)  # the ranks map the weights instead of copying them
            try:
                self._world.rank_group = RankGroup(world, child_main,
                                                   args=(self.config, (model_cfg, shared), num_blocks))
                self._world.rank_group.join_as_rank0()
            except Exception as e:  # noqa: BLE001
                self._finalizer()
                raise CspsError(f"could not start {world} ranks: {str(e).splitlines()[0]}") from None
            finally:
                shared.close()  # every rank has mapped it by now (or failed)
        else:
            from csps.parallel.groups import init_distributed

            init_distributed(self.config.parallel.backend)
            agree_num_blocks(num_blocks)
        self.rt = RankRuntime(self.config, (model_cfg, state_dict), num_blocks)
        self._world.world = self.rt.groups.world
        self.model, self.cache = self.rt.model, self.rt.cache
        try:
            link = self.rt.handshake()
        except Exception as e:  # noqa: BLE001
            raise self._failure(e) from None
        sp = self.config.parallel
        forced = "ulysses" if sp.sp_attn == "ulysses" else (None if sp.sp_exchange == "auto" else sp.sp_exchange)
        self.exchange = ExchangePolicy.calibrate(model_cfg, torch.finfo(self.dtype).bits // 8, sp.sp, sp.tp,
                                                 link, torch.get_num_threads(), forced)
        self._last_bytes: dict[str, int] = {}

    @property
    def rank_group(self):
        return self._world.rank_group

    @property
    def dead(self) -> str | None:
        return self._world.dead

    # -- plans -----------------------------------------------------------------------------
    def build_plan(self, out: SchedulerOutput) -> StepPlan:
        plan = StepPlan(step_id=out.step_id)
        self._sampling_req_ids = [c.req_id for c in out.chunks if c.samples]
        p, bs = self.num_sp_ranks, self.config.cache.block_size
        for c in out.chunks:
            req = self.scheduler.requests[c.req_id]
            end = c.start + c.num_tokens
            if not c.sp:
                r = c.ranks[0]
                plan.per_rank.setdefault(r, []).append(SeqWork(
                    req_id=c.req_id, token_ids=req.token_ids(c.start, end), pos=[(c.start, end)],
                    block_ids=self.kvs[r].table(c.req_id), num_kv_before=c.start, is_decode=c.is_decode,
                    sample=c.samples))
                continue
            ranges = kp.ranges_per_rank(c.start, end, p, bs)
            per_rank = []
            for r in range(p):
                toks = [t for a, b in ranges[r] for t in req.token_ids(a, b)]
                per_rank.append(SeqWork(
                    req_id=c.req_id, token_ids=toks, pos=ranges[r], block_ids=self.kvs[r].table(c.req_id),
                    num_kv_before=kp.count_before(c.start, r, p, bs), sp_layout=(p, r, bs),
                    is_decode=c.is_decode and bool(toks), sample=c.samples and kp.rank_of(end - 1, p, bs) == r))
            exchange = "pass_q" if c.is_decode else self.exchange.choose(c.num_tokens, c.start)
            plan.sp_seqs.append(SPSeqWork(req_id=c.req_id, per_rank=per_rank, exchange=exchange,
                                          owner_rank=kp.rank_of(end - 1, p, bs)))
        return plan

    # -- execution -------------------------------------------------------------------------
    def _failure(self, e: BaseException) -> CspsError:
        detail = self.rank_group.first_error() if self.rank_group is not None else None
        self._world.dead = detail or f"rank 0 failed: {type(e).__name__}: {e}"
        log.error("engine failed: %s", self.dead)
        self._finalizer()
        return CspsError(f"the engine's ranks failed ({self.dead.splitlines()[0]})")

    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        if self.dead:
            raise CspsError(f"the engine is dead: {self.dead.splitlines()[0]}")
        if not self._finalizer.alive:
            raise CspsError("the engine was shut down")
        world = self.rt.groups.world
        try:
            world.broadcast_bytes(plan.to_bytes(), src=0, kind="plan")
            hidden = self.rt.execute(plan)
            order = sample_order(plan, self.rt.groups)
            parts = world.gather_to(hidden, dst=0, kind="sample")
            stats = world.gather_to(self.rt.step_bytes_tensor(BYTE_KINDS), dst=0, kind="stats")
        except Exception as e:  # noqa: BLE001 - a rank failed mid-step
            raise self._failure(e) from None
        total = torch.stack(stats).sum(0).tolist()
        self._last_bytes = {k: int(v) for k, v in zip(BYTE_KINDS, total) if v}
        rows = torch.cat([x for x in parts if x.numel()]) if any(x.numel() for x in parts) else None
        if rows is None:
            return None
        logits = self.model.logits(rows)
        # reorder from gather order (rank by rank) to the scheduler's chunk order
        index = {req_id: i for i, req_id in enumerate(order)}
        return logits[[index[r] for r in self._sampling_req_ids]]

    def step_bytes(self) -> dict[str, int]:
        return dict(self._last_bytes)

    def shutdown(self) -> None:
        """Stop the ranks now (also done when the engine is dropped or the interpreter exits)."""
        self._finalizer()
