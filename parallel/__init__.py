"""csps.parallel: process groups, counted communication, sharding, and sequence-parallel attention.

Modules (one concept each):
  comm            ``Comm``: the only caller of torch.distributed; counts bytes sent per op kind.
  groups          ``init_distributed``, ``build_groups`` -> ``ParallelGroups`` (world = SP x TP).
  launch          ``spawn``: W local gloo ranks for tests and benchmarks, with clear failures.
  sharding        contiguous / zigzag token shards of a prefill chunk; causal work per rank.
  ring_attention  pass-KV ring attention (KV rotates, queries stay).
  pass_q          pass-Q attention (queries travel, partial (out, lse) return to the owner).
  ulysses         all-to-all attention through DeepSpeed (imported lazily).
  tp              tensor-parallel weight sharding and the row-parallel all-reduce.
Imports ``csps.kernels`` only; nothing here imports the engine or the server.
"""

from csps.parallel.comm import Comm, RingHandle
from csps.parallel.groups import ParallelGroups, build_groups, init_distributed
from csps.parallel.launch import SpawnError, SpawnTimeout, spawn
from csps.parallel.pass_q import local_attn_from_kv, pass_q_attention
from csps.parallel.ring_attention import ring_attention
from csps.parallel.sharding import (
    causal_work_pairs,
    causal_work_per_rank,
    contiguous_shards,
    shard_indices,
    shard_sizes,
    zigzag_shards,
)
from csps.parallel.ulysses import ulysses_attention

__all__ = [
    "Comm",
    "RingHandle",
    "ParallelGroups",
    "build_groups",
    "init_distributed",
    "SpawnError",
    "SpawnTimeout",
    "spawn",
    "local_attn_from_kv",
    "pass_q_attention",
    "ring_attention",
    "causal_work_pairs",
    "causal_work_per_rank",
    "contiguous_shards",
    "shard_indices",
    "shard_sizes",
    "zigzag_shards",
    "ulysses_attention",
]
