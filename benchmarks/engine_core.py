"""Engine-core benchmarks (issue: engine core), side by side with transformers in one run.

  (a) TTFT of a 4k-token prompt vs one transformers forward (target <= 1.1x)
  (b) prefill with token budget 512 vs unchunked (target <= 1.3x, Sarathi's <= 25% overhead)
  (c) throughput of 32 requests (512-token prompts, 128 output tokens) vs transformers
      `generate` one request at a time (target >= 5x)
  (d) single-stream decode tokens/s vs transformers (target >= 2x)

Same model file (SmolLM2-135M-Instruct GGUF), same dtype (auto: fp32 on CPUs without native bf16),
same threads. Run: .venv/bin/python benchmarks/engine_core.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import BOOKS, median, save, table, timed  # noqa: E402

from csps import LLM, SamplingParams  # noqa: E402
from csps.device import resolve_dtype  # noqa: E402
from csps.engine.weights import default_model_path  # noqa: E402


def book_ids(tok, n: int, offset: int = 0) -> list[int]:
    with open(os.path.join(BOOKS, "pride_and_prejudice.txt")) as f:
        text = f.read()
    ids = tok.encode(text[offset * 5 : offset * 5 + n * 8])
    assert len(ids) >= n
    return ids[:n]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer requests/tokens (smoke run)")
    ap.add_argument("--hf-requests", type=int, default=4, help="requests timed for the transformers baseline in (c)")
    args = ap.parse_args()
    dtype_name = resolve_dtype("auto")
    dtype = getattr(torch, dtype_name)
    reps = 1 if args.quick else 3
    n_req, out_len, prompt_len = (8, 32, 512) if args.quick else (32, 128, 512)

    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                              dtype=dtype).eval()
    # prefix caching off: every run must compute its whole prompt
    unchunked = LLM("smollm2", dtype=dtype_name, token_budget=4096, max_num_seqs=64, enable_prefix_caching=False)
    chunked = LLM("smollm2", dtype=dtype_name, token_budget=512, max_num_seqs=64, enable_prefix_caching=False)
    tok = unchunked.get_tokenizer()
    results: dict = {"dtype": dtype_name}

    # (a) + (b): TTFT of a 4k prompt, interleaved runs
    ids = book_ids(tok, 4096)
    one = SamplingParams(max_tokens=1, temperature=0)
    x = torch.tensor([ids])
    hf_t, ours_t, chunk_t = [], [], []
    for i in range(reps):
        with torch.inference_mode():
            hf_t.append(timed(lambda: hf(x, logits_to_keep=1)))
        fresh = book_ids(tok, 4096, offset=1000 * (i + 1))  # no prefix-cache help
        ours_t.append(unchunked.generate([fresh], one, use_tqdm=False)[0].metrics.ttft_s)
        chunk_t.append(chunked.generate([fresh], one, use_tqdm=False)[0].metrics.ttft_s)
    results["a_ttft_4k"] = {"hf_forward_s": median(hf_t), "csps_s": median(ours_t),
                            "ratio": median(ours_t) / median(hf_t), "target": "<= 1.1"}
    results["b_chunked_prefill_4k"] = {"budget_4096_s": median(ours_t), "budget_512_s": median(chunk_t),
                                       "ratio": median(chunk_t) / median(ours_t), "target": "<= 1.3"}
    print("a/b done", results["a_ttft_4k"], results["b_chunked_prefill_4k"], flush=True)

    # (d) single-stream decode
    p = book_ids(tok, 128, offset=50_000)
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    o = unchunked.generate([p], sp, use_tqdm=False)[0]
    ours_tps = (len(o.metrics.tbt_s)) / sum(o.metrics.tbt_s)
    xp = torch.tensor([p])
    kw = dict(attention_mask=torch.ones_like(xp), do_sample=False, eos_token_id=None, pad_token_id=2)
    with torch.inference_mode():
        t1 = timed(lambda: hf.generate(xp, max_new_tokens=1, min_new_tokens=1, **kw))
        tn = timed(lambda: hf.generate(xp, max_new_tokens=out_len, min_new_tokens=out_len, **kw))
    hf_tps = (out_len - 1) / (tn - t1)
    results["d_decode_tokens_per_s"] = {"hf": hf_tps, "csps": ours_tps, "ratio": ours_tps / hf_tps,
                                        "target": ">= 2"}
    print("d done", results["d_decode_tokens_per_s"], flush=True)

    # (c) throughput: 32 x (512 in, 128 out)
    prompts = [book_ids(tok, prompt_len, offset=60_000 + 700 * i) for i in range(n_req)]
    sp = SamplingParams(max_tokens=out_len, temperature=0, ignore_eos=True)
    ours_s = timed(lambda: chunked.generate(prompts, sp, use_tqdm=False))
    hf_each = []
    for pr in prompts[: args.hf_requests]:
        xp = torch.tensor([pr])
        kw = dict(attention_mask=torch.ones_like(xp), do_sample=False, eos_token_id=None, pad_token_id=2)
        with torch.inference_mode():
            hf_each.append(timed(lambda: hf.generate(xp, max_new_tokens=out_len, min_new_tokens=out_len, **kw)))
    hf_total = median(hf_each) * n_req
    results["c_throughput"] = {
        "requests": n_req, "prompt_tokens": prompt_len, "output_tokens": out_len,
        "csps_s": ours_s, "csps_output_tokens_per_s": n_req * out_len / ours_s,
        "hf_one_at_a_time_s_extrapolated": hf_total, "hf_requests_timed": args.hf_requests, "hf_each_s": hf_each,
        "ratio": hf_total / ours_s, "target": ">= 5"}
    print("c done", results["c_throughput"], flush=True)

    path = save("engine_core", results)
    rows = [
        ("(a) TTFT 4k prompt vs one HF forward", f"{results['a_ttft_4k']['csps_s']:.2f} s vs {results['a_ttft_4k']['hf_forward_s']:.2f} s", f"{results['a_ttft_4k']['ratio']:.2f}x", "<= 1.1x"),
        ("(b) prefill 4k, budget 512 vs unchunked", f"{results['b_chunked_prefill_4k']['budget_512_s']:.2f} s vs {results['b_chunked_prefill_4k']['budget_4096_s']:.2f} s", f"{results['b_chunked_prefill_4k']['ratio']:.2f}x", "<= 1.3x"),
        (f"(c) {n_req} req x ({prompt_len} in, {out_len} out) vs HF one at a time", f"{results['c_throughput']['csps_s']:.1f} s vs {hf_total:.1f} s", f"{results['c_throughput']['ratio']:.1f}x faster", ">= 5x"),
        ("(d) single-stream decode", f"{ours_tps:.1f} vs {hf_tps:.1f} tok/s", f"{ours_tps / hf_tps:.2f}x", ">= 2x"),
    ]
    print(table(rows, ("measure", "csps vs transformers", "ratio", "target")))
    print("wrote", path)
    unchunked.shutdown()
    chunked.shutdown()


if __name__ == "__main__":
    main()
