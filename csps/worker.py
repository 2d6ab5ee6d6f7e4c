"""A rank's executor: turns its part of a step plan into tensors and runs the model."""

from __future__ import annotations

import torch

from csps.attn_context import KVCacheTensors, LocalAttention
from csps.model import LlamaModel
from csps.plan import SeqWork, StepPlan, ranges_to_list


def batch_tensors(seqs: list[SeqWork]) -> tuple[torch.Tensor, torch.Tensor]:
    ids: list[int] = []
    pos: list[int] = []
    for s in seqs:
        ids.extend(s.token_ids)
        pos.extend(ranges_to_list(s.pos))
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(pos, dtype=torch.int64)


def sample_rows(seqs: list[SeqWork]) -> list[int]:
    rows, row = [], 0
    for s in seqs:
        row += s.num_tokens
        if s.sample:
            rows.append(row - 1)
    return rows


class Worker:
    """Single-rank execution: the model and this rank's KV cache."""

    def __init__(self, model: LlamaModel, cache: KVCacheTensors) -> None:
        self.model = model
        self.cache = cache
        cfg = model.cfg
        tp = model.tp
        group = cfg.num_heads // cfg.num_kv_heads
        even = model.num_local_heads % model.num_local_kv_heads == 0 and (
            model.num_local_heads // model.num_local_kv_heads == group)
        self.kv_head_map = None if even else tp.kv_head_of_q_head(cfg.num_heads, cfg.num_kv_heads)

    def attention_for(self, seqs: list[SeqWork]) -> LocalAttention:
        return LocalAttention(seqs, self.cache, self.model.scale, self.model.cfg.sliding_window,
                              self.kv_head_map)

    @torch.inference_mode()
    def forward_hidden(self, seqs: list[SeqWork]) -> torch.Tensor:
        """Final hidden states [T, H] of every new token of ``seqs`` (tests read all logits)."""
        input_ids, positions = batch_tensors(seqs)
        return self.model.forward(input_ids, positions, self.attention_for(seqs))

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """Runs the plan's local sequences; logits [num_sampled, V] fp32 in plan order."""
        seqs = plan.seqs
        if not seqs:
            return None
        hidden = self.forward_hidden(seqs)
        rows = sample_rows(seqs)
        if not rows:
            return None
        return self.model.logits(hidden[rows])
