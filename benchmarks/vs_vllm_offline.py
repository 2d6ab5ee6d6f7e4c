"""One side of ``vs_vllm.py``'s offline comparison, run in that engine's own environment.

    python vs_vllm_offline.py csps|vllm SPEC.json OUT.json

SPEC names the model directory, the dtype and the token ids of every prompt; both engines get the same
ids and greedy decoding with ``ignore_eos``. Measured, in this order, after one warm-up request:
  ttft_4k_s      one 4,096-token prompt, max_tokens 1 (the whole call: prefill and one token)
  decode_tok_s   one stream: (max_tokens 257 - max_tokens 1) on two different 128-token prompts, so
                 the difference is 256 decode steps (a prefix cache cannot help either call)
  batch_s        32 prompts of 512 tokens, 128 tokens each, submitted together
"""

from __future__ import annotations

import json
import os
import sys
import time


def run_vllm(spec: dict):
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import vllm_peer  # noqa: F401  (the version lookup vLLM needs; before importing vllm)
    from vllm import LLM, SamplingParams, TokensPrompt

    llm = LLM(model=spec["model_dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0)
    cfg = llm.llm_engine.vllm_config

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        return [len(o.outputs[0].token_ids) for o in outs]

    info = {"engine": "vllm", "max_num_batched_tokens": cfg.scheduler_config.max_num_batched_tokens,
            "max_num_seqs": cfg.scheduler_config.max_num_seqs}
    return generate, info, lambda: None


def run_csps(spec: dict):
    import torch

    from csps import LLM, SamplingParams

    llm = LLM(spec["model_dir"], dtype=spec["dtype"], max_model_len=spec["max_model_len"])

    def generate(prompts: list[list[int]], max_tokens: int) -> list[int]:
        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        return [len(o.token_ids) for o in llm.generate(prompts, params, use_tqdm=False)]

    sched = llm.engine.config.scheduler
    info = {"engine": "csps", "max_num_batched_tokens": sched.token_budget, "max_num_seqs": sched.max_num_seqs,
            "threads": torch.get_num_threads()}
    return generate, info, llm.shutdown


def main() -> int:
    engine, spec_path, out_path = sys.argv[1:4]
    with open(spec_path) as f:
        spec = json.load(f)
    t0 = time.perf_counter()
    generate, info, close = (run_vllm if engine == "vllm" else run_csps)(spec)
    info["start_s"] = time.perf_counter() - t0
    p = spec["prompts"]
    generate([p["warmup"]], 8)

    def timed(prompts, max_tokens):
        t = time.perf_counter()
        counts = generate(prompts, max_tokens)
        return time.perf_counter() - t, counts

    info["ttft_4k_s"], _ = timed([p["ttft"]], 1)
    one_s, _ = timed([p["decode_a"]], 1)
    many_s, counts = timed([p["decode_b"]], 257)
    assert counts == [257], counts
    info["decode_tok_s"] = 256 / (many_s - one_s)
    info["batch_s"], counts = timed(p["batch"], 128)
    assert counts == [128] * len(p["batch"]), counts
    close()
    with open(out_path, "w") as f:
        json.dump(info, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
