"""Run the same workload on the single-process engine and on SP × TP layouts, and compare."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from csps.core.sampling_params import SamplingParams
from csps.llm import create_engine, make_engine_config

GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)


@dataclass
class Result:
    tokens: dict[str, list[int]]
    logits: dict[str, torch.Tensor]
    cached: dict[str, int]
    preemptions: int
    bytes_by_kind: dict[str, int]


def run(weights, workload, sp=1, tp=1, tokenizer=None, dtype="float32", **kw) -> Result:
    """workload: list of waves; each wave is a list of (req_id, prompt ids) run to completion together."""
    cfg = make_engine_config(model="test", dtype=dtype, sp=sp, tp=tp, **kw)
    engine = create_engine(cfg, max_model_len=kw.get("max_model_len"), weights=weights,
                           tokenizer=tokenizer, load_tokenizer_=tokenizer is not None)
    engine.logits_sink = {}
    tokens, cached, preempt, nbytes = {}, {}, 0, {}
    try:
        for wave in workload:
            for rid, ids in wave:
                engine.add_request(ids, GREEDY, request_id=rid)
            while engine.has_unfinished():
                for o in engine.step():
                    if o.finished:
                        tokens[o.request_id] = o.token_ids
                        cached[o.request_id] = o.num_cached_tokens
                        preempt += o.num_preemptions
            for rec in engine.step_log:
                for k, v in rec.bytes_by_kind.items():
                    nbytes[k] = nbytes.get(k, 0) + v
        # every finished request gave its blocks back (the prefix cache may still hold unreferenced ones)
        assert all(not kv.tables for kv in engine.kvs)
        if not cfg.cache.enable_prefix_caching:
            assert all(n == 0 for n in engine.stats()["kv_blocks_used"])
    finally:
        engine.shutdown()
    logits = {k: torch.stack(v) for k, v in engine.logits_sink.items()}
    return Result(tokens, logits, cached, preempt, nbytes)


def max_logit_diff(a: Result, b: Result) -> float:
    return max(float((a.logits[k] - b.logits[k]).abs().max()) for k in a.logits)
