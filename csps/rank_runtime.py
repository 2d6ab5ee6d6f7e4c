"""What one rank of an SP × TP world holds and does: its model shard, its KV cache, its groups.

``execute(plan)`` runs the rank's share of a step — its single-rank sequences plus its share of
every sequence-parallel one — and returns the final hidden states of the tokens it must sample
(only TP rank 0 of each SP group returns them; TP peers hold identical activations).
"""

from __future__ import annotations

import torch

from csps.attn_context import KVCacheTensors
from csps.engine import TORCH_DTYPES
from csps.exchange import measure_link
from csps.hardware import LinkProfile
from csps.model import LlamaModel, TPShard
from csps.parallel.groups import ParallelGroups, build_groups
from csps.plan import StepPlan
from csps.sp_attention import SPAttention
from csps.worker import batch_tensors, sample_rows


def sample_order(plan: StepPlan, groups: ParallelGroups) -> list[str]:
    """Request ids of the sampled rows, in the order rank 0 gathers them (world rank by world rank)."""
    order = []
    for w in range(groups.world_size):
        sp_rank, tp_rank = divmod(w, groups.tp)
        if tp_rank:
            continue
        order += [s.req_id for s in plan.per_rank.get(sp_rank, []) if s.sample]
        order += [s.req_id for s in plan.sp_seqs if s.per_rank[sp_rank].sample]
    return order


class RankRuntime:
    def __init__(self, config, weights, num_blocks: int) -> None:
        p = config.parallel
        self.config = config
        self.groups = build_groups(p.sp, p.tp)
        model_cfg, state_dict = weights
        dtype = TORCH_DTYPES[config.dtype]
        shard = TPShard(self.groups.tp_rank, p.tp)
        self.model = LlamaModel(model_cfg, state_dict, dtype, shard, tp_comm=self.groups.tp_comm)
        self.cache = KVCacheTensors(model_cfg.num_layers, num_blocks, config.cache.block_size,
                                    self.model.num_local_kv_heads, model_cfg.head_dim, dtype)
        group = model_cfg.num_heads // model_cfg.num_kv_heads
        uneven = [h // group for h in range(*shard.head_range(model_cfg.num_heads))]
        k0 = shard.kv_head_range(model_cfg.num_heads, model_cfg.num_kv_heads)[0]
        even = self.model.num_local_heads == self.model.num_local_kv_heads * group
        self.kv_head_map = None if even else [h - k0 for h in uneven]
        self.fault = config.debug_fault  # (world rank, step id): tests inject a failure

    def handshake(self) -> LinkProfile | None:
        """Collective start-up: measure the SP link (every rank takes part)."""
        comm = self.groups.sp_comm if self.groups.sp > 1 else self.groups.world
        if comm.size == 1:
            return None
        return measure_link(comm)

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor:
        if self.fault is not None and self.fault == (self.groups.world_rank, plan.step_id):
            raise RuntimeError(f"injected fault at step {plan.step_id}")
        me = self.groups.sp_rank
        local = plan.per_rank.get(me, [])
        empty = torch.zeros(0, self.model.cfg.hidden_size, dtype=self.model.dtype)
        if not local and not plan.sp_seqs:
            return empty
        seqs = local + [s.per_rank[me] for s in plan.sp_seqs]
        input_ids, positions = batch_tensors(seqs)
        attn = SPAttention(local, plan.sp_seqs, me, self.cache, self.groups.sp_comm, self.model.scale,
                           self.model.cfg.sliding_window, self.kv_head_map)
        hidden = self.model.forward(input_ids, positions, attn)
        if self.groups.tp_rank:
            return empty
        return hidden[sample_rows(seqs)].contiguous()

    def step_bytes_tensor(self, kinds: tuple[str, ...]) -> torch.Tensor:
        """Bytes this rank sent in the step, per kind (all its communicators), then reset."""
        comms = {id(c): c for c in (self.groups.world, self.groups.sp_comm, self.groups.tp_comm)}
        totals = [sum(c.bytes_step.get(k, 0) for c in comms.values()) for k in kinds]
        for c in comms.values():
            c.reset_step()
        return torch.tensor(totals, dtype=torch.int64)

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
