"""What one rank of an SP × TP world holds and does: its model shard, its KV cache, its block
tables, its groups. The same class runs every world size; at world size 1 its groups are groups of
one and nothing is communicated.

``execute(plan)`` runs the rank's share of a step — its single-rank sequences plus its share of
every sequence-parallel chunk — and returns the final hidden states of the tokens it must sample
(only TP rank 0 of each SP group returns them; TP peers hold identical activations).
Ranks 1..W-1 run ``rank_loop``: receive their plan, run it, send results, until a shutdown plan.
"""

from __future__ import annotations

import logging
import os
import sys

import torch

from csps.core.plan import SeqWork, StepPlan, ranges_to_list
from csps.core.tp_shard import TPShard
from csps.device import cpu_binding, distributed_backend, rank_device
from csps.dtypes import torch_dtype
from csps.engine.block_tables import RankBlockTables
from csps.engine.exchange import measure_link
from csps.engine.model import LlamaModel
from csps.engine.paged_attention import KVCacheTensors
from csps.engine.sp_attention import SPAttention
from csps.kernels import cpu_ext
from csps.kernels.decode import HeadGroups
from csps.parallel.comm import Comm
from csps.parallel.groups import ParallelGroups, build_groups
from csps.perf.hardware import LinkProfile

log = logging.getLogger("csps.rank_runtime")

# the kinds of bytes a step moves, in the order ranks report them to rank 0
BYTE_KINDS = ("plan", "sample", "pass_kv", "pass_q", "pass_q_pos", "pass_q_out", "ulysses_a2a",
              "tp_allreduce")


def batch_tensors(seqs: list[SeqWork], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The packed batch on ``device``: token ids [T] and positions [T] (int64), sequence after sequence."""
    ids: list[int] = []
    pos: list[int] = []
    for s in seqs:
        ids.extend(s.token_ids)
        pos.extend(ranges_to_list(s.pos))
    both = torch.tensor([ids, pos], dtype=torch.int64)  # one host-to-device copy
    if device.type == "cuda":
        both = both.pin_memory().to(device, non_blocking=True)
    return both[0], both[1]


def sample_rows(seqs: list[SeqWork]) -> list[int]:
    """Rows of the packed batch whose hidden state is sampled (each sampling sequence's last token)."""
    rows, row = [], 0
    for s in seqs:
        row += s.num_tokens
        if s.sample:
            rows.append(row - 1)
    return rows


def sample_shapes(plans: list[StepPlan], tp: int, hidden_size: int) -> list[tuple[int, int]]:
    """The shape of every world rank's sampled hidden states: its SP rank's sampling sequences (on TP
    rank 0; TP peers return none), so rank 0 gathers them without a shape exchange."""
    def rows(plan: StepPlan) -> int:
        return sum(s.sample for s in plan.seqs) + sum(s.mine.sample for s in plan.sp_seqs)

    return [(rows(plans[w // tp]) if w % tp == 0 else 0, hidden_size) for w in range(len(plans) * tp)]


class RankRuntime:
    def __init__(self, config, weights, num_blocks: int) -> None:
        p = config.parallel
        self.config = config
        self.device = rank_device(config.device, int(os.environ.get("LOCAL_RANK", "0")))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.groups: ParallelGroups = build_groups(p.sp, p.tp, self.device)
        model_cfg, state_dict = weights
        dtype = torch_dtype(config.dtype)
        shard = TPShard(self.groups.tp_rank, p.tp)
        self.model = LlamaModel(model_cfg, state_dict, dtype, shard, tp_comm=self.groups.tp_comm, device=self.device)
        self.cache = KVCacheTensors(model_cfg.num_layers, num_blocks, config.cache.block_size,
                                    self.model.num_local_kv_heads, model_cfg.head_dim, dtype, self.device)
        self.tables = RankBlockTables(-(-config.scheduler.max_model_len // config.cache.block_size), device=self.device)
        self.heads = HeadGroups.of(self.model.num_local_heads, self.model.num_local_kv_heads, self.model.kv_head_map)
        self.heads = self.heads.to(self.device)
        if self.device.type == "cpu":
            cpu_ext.load()  # build or load the C++ CPU kernels now, not in the first step (logged; may fall back)
            self._pin_threads()
        self.fault = config.debug_fault  # (world rank, step id): tests inject a failure

    def _pin_threads(self) -> None:
        """Pin this rank's compute threads to its own CPUs (``csps.device.cpu_binding``)."""
        g = self.groups
        local_rank = int(os.environ.get("LOCAL_RANK", g.world_rank))
        num_local = int(os.environ.get("LOCAL_WORLD_SIZE", g.world_size))
        cpus = cpu_binding(local_rank, num_local, torch.get_num_threads())
        if cpus is not None and cpu_ext.bind_threads(cpus):
            log.info("rank %d: %d compute thread(s) pinned to CPU %s", g.world_rank, len(cpus),
                     ",".join(map(str, cpus)))

    def handshake(self) -> LinkProfile | None:
        """Collective start-up: measure the SP link (every rank takes part)."""
        comm = self.groups.sp_comm if self.groups.sp > 1 else self.groups.world
        if comm.size == 1:
            return None
        return measure_link(comm)

    def attention_for(self, plan: StepPlan) -> SPAttention:
        return SPAttention(plan.seqs, plan.sp_seqs, self.tables, self.cache, self.groups.sp_comm, self.model.scale,
                           self.heads, self.model.cfg.sliding_window)

    @torch.inference_mode()
    def forward_hidden(self, plan: StepPlan) -> torch.Tensor:
        """Applies the plan's block-table changes, runs it; final hidden states [T, H] of every new token."""
        self.tables.apply(plan)
        seqs = plan.seqs + [s.mine for s in plan.sp_seqs]
        input_ids, positions = batch_tensors(seqs, self.device)
        return self.model.forward(input_ids, positions, self.attention_for(plan))

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        """Hidden states [num_sampled, H] of the rows this rank samples (none on TP ranks > 0)."""
        if self.fault is not None and self.fault == (self.groups.world_rank, plan.step_id):
            raise RuntimeError(f"injected fault at step {plan.step_id}")
        empty = torch.zeros(0, self.model.cfg.hidden_size, dtype=self.model.dtype, device=self.device)
        if plan.empty:
            self.tables.apply(plan)
            return empty
        hidden = self.forward_hidden(plan)
        if self.groups.tp_rank:
            return empty
        return hidden[sample_rows(plan.seqs + [s.mine for s in plan.sp_seqs])].contiguous()

    def step_bytes_tensor(self) -> torch.Tensor:
        """Bytes this rank sent in the step, per kind in ``BYTE_KINDS`` (all its communicators), then reset;
        a CPU tensor, for the control group."""
        g = self.groups
        comms = {id(c): c for c in (g.world, g.sp_comm, g.tp_comm, g.control)}
        totals = [sum(c.bytes_step.get(k, 0) for c in comms.values()) for k in BYTE_KINDS]
        for c in comms.values():
            c.reset_step()
        return torch.tensor(totals, dtype=torch.int64)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def rank_loop(rt: RankRuntime) -> None:
    """Ranks 1..W-1: execute their plans until told to stop."""
    world, control = rt.groups.world, rt.groups.control
    while True:
        plan = StepPlan.from_bytes(control.scatter_bytes(None, src=0, kind="plan"))
        if plan.shutdown:
            return
        hidden = rt.execute(plan)
        world.gather_to(hidden, dst=0, kind="sample", shapes=())  # rank 0 knows every shape from the plans
        control.gather_to(rt.step_bytes_tensor(), dst=0, kind="stats", shapes=())


def child_main(rank: int, world_size: int, config, weights, num_blocks: int) -> None:
    """A rank process started by rank 0 (``RankGroup``): build the runtime, serve plans."""
    from csps.engine.weights import SharedWeights

    model_cfg, sd = weights
    if isinstance(sd, SharedWeights):
        sd = sd.state_dict()
    rt = RankRuntime(config, (model_cfg, sd), num_blocks)
    del weights, sd
    rt.handshake()
    rank_loop(rt)
    rt.close()


def agree_num_blocks(num_blocks: int) -> int:
    """Under torchrun each rank sized its pool from its own free memory: take rank 0's size."""
    import torch.distributed as dist

    t = torch.tensor([num_blocks], dtype=torch.int64)
    Comm(None, list(range(dist.get_world_size()))).broadcast(t, src=0, kind="plan")
    return int(t[0])


def torchrun_worker_main(config, weights, num_blocks: int) -> None:
    """A non-zero rank launched by torchrun: join the rendezvous, serve plans, exit the process."""
    from csps.parallel.groups import init_distributed

    init_distributed(distributed_backend(config.device, config.parallel.backend))
    code = 0
    try:
        child_main(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), config, weights,
                   agree_num_blocks(num_blocks))
    except Exception as e:  # noqa: BLE001
        log.error("rank %s failed: %s", os.environ["RANK"], e)
        code = 1
    sys.exit(code)
