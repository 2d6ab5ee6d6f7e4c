"""The ranks an engine runs on: checking the layout, starting ranks 1..W-1, stopping them.

At world size 1 there is nothing to start (rank 0's groups are groups of one). Locally, rank 0 starts
the other ranks as child processes (``csps.parallel.rank_group``); under ``torchrun`` they already
exist. ``RankWorld.close`` stops what this engine started; the engine calls it through a
``weakref.finalize``, so dropping the engine, garbage collection or interpreter exit stop its ranks.
"""

from __future__ import annotations

import logging
import os

import torch

from csps.core.plan import StepPlan
from csps.device import check_ranks_per_node, distributed_backend
from csps.errors import CspsError

log = logging.getLogger("csps.rank_world")


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def is_torchrun_worker() -> bool:
    """Ranks 1..W-1 under torchrun: they serve rank 0's plans instead of building an engine."""
    return under_torchrun() and int(os.environ["RANK"]) != 0


def check_devices(config) -> None:
    """Refuse more CUDA ranks on this node than it has GPUs (before weights load and ranks start)."""
    p = config.parallel
    num_local = int(os.environ.get("LOCAL_WORLD_SIZE", p.world_size)) if under_torchrun() else p.world_size
    check_ranks_per_node(config.device, num_local)


def check_layout(config, model_cfg) -> None:
    """Refuse impossible layouts before any rank starts."""
    check_devices(config)
    p = config.parallel
    if p.tp > model_cfg.num_heads:
        raise CspsError(f"--tp {p.tp} exceeds the model's {model_cfg.num_heads} attention heads")
    env_world = os.environ.get("WORLD_SIZE")
    if p.world_size > 1 and env_world is not None and int(env_world) != p.world_size:
        raise CspsError(f"--sp {p.sp} x --tp {p.tp} = {p.world_size} ranks, but torchrun started {env_world}")
    if p.sp_attn == "ulysses" and p.sp > 1:
        kv_local = -(-model_cfg.num_kv_heads // p.tp)
        if kv_local < p.sp:
            raise CspsError(f"--sp-attn ulysses needs at least one KV head per SP rank: {kv_local} KV heads "
                            f"per TP rank for --sp {p.sp}; use --sp-attn ring")
    cores = os.cpu_count() or 1
    if p.world_size > cores and config.device == "cpu":
        log.warning("%d ranks on %d CPU cores: ranks will time-share the cores", p.world_size, cores)


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


class RankWorld:
    """The ranks an engine started, and how they are shut down (holds no reference to the engine)."""

    def __init__(self) -> None:
        self.rank_group = None  # local child processes (None at world size 1 and under torchrun)
        self.owns_group = False  # this engine initialized torch.distributed and must tear it down
        self.threads_before = torch.get_num_threads()
        self.cpus_before = os.sched_getaffinity(0)  # the rank runtime pins this thread; close() restores it
        self.world = None  # rank 0's world Comm, once the runtime is built
        self.dead: str | None = None

    def start(self, config, model_cfg, state_dict, num_blocks: int) -> None:
        """Bring up ranks 1..W-1 and join them as rank 0 (nothing to do at world size 1)."""
        from csps.engine.rank_runtime import agree_num_blocks, child_main
        from csps.engine.weights import SharedWeights

        world = config.parallel.world_size
        if world == 1:
            return
        if under_torchrun():
            from csps.parallel.groups import init_distributed

            init_distributed(distributed_backend(config.device, config.parallel.backend))
            self.owns_group = True
            agree_num_blocks(num_blocks)
            return
        from csps.parallel.rank_group import RankGroup

        refuse_if_ranks_running()
        shared = SharedWeights(state_dict)  # the ranks map the weights instead of copying them
        try:
            self.rank_group = RankGroup(world, child_main, args=(config, (model_cfg, shared), num_blocks),
                                        backend=distributed_backend(config.device, config.parallel.backend))
            self.owns_group = True
            self.rank_group.join_as_rank0()
        except Exception as e:  # noqa: BLE001
            self.close()
            raise CspsError(f"could not start {world} ranks: {str(e).splitlines()[0]}") from None
        finally:
            shared.close()  # every rank has mapped it by now (or failed)

    def alive(self) -> bool:
        return self.rank_group is None or self.rank_group.alive()

    def first_error(self) -> str | None:
        return self.rank_group.first_error() if self.rank_group is not None else None

    def close(self) -> None:
        import torch.distributed as dist

        alive = self.alive()
        if not self.dead and alive and self.world is not None and self.world.size > 1:
            try:
                self.world.scatter_bytes([StepPlan(step_id=-1, shutdown=True).to_bytes()] * self.world.size,
                                         src=0, kind="plan")
            except Exception:  # noqa: BLE001 - the ranks are stopped below either way
                pass
        if self.rank_group is not None:
            self.rank_group.stop(grace_s=5.0 if alive and not self.dead else 0.5)
        if self.owns_group:
            try:
                if dist.is_initialized():
                    dist.destroy_process_group()
            except Exception:  # noqa: BLE001
                pass
            torch.set_num_threads(self.threads_before)
        os.sched_setaffinity(0, self.cpus_before)
        self.world = None
