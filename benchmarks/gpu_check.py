"""csps on one CUDA GPU, checked in one command (under 8 minutes on an H100/H200):

    python benchmarks/gpu_check.py [--hardware auto|h100|h200] [--json OUT.json]

Needs only torch, transformers, safetensors and csps installed (``pip install --no-deps -e .`` works: random
weights of real shapes, no model download, no tokenizer). It prints:
  1. the device, torch/CUDA versions and which attention kernels run (flash-attn, else torch's CUDA SDPA);
  2. greedy tokens of csps on the GPU against transformers on the same GPU, weights and dtype (bf16), for
     SmolLM2-135M's shapes and Llama-3-8B's: equal, or the first divergence with both top-2 margins (a
     divergence counts only where they are below 2% of the logit scale: bf16 near-ties);
  3. TTFT of 32k- and 128k-token prompts on dummy:llama3-8b with the achieved TFLOP/s against the GPU's bf16
     peak, and the cost model's prediction (``--hardware``) next to each;
  4. decode time between tokens at batch 1 and 32 (1k-token contexts), with the cost model's prediction;
  5. SP 2 (TTFT of 32k over 2 ranks) where the machine has 2 GPUs, else skipped with the reason (NCCL
     needs one GPU per rank).
Without CUDA it exits with status 1 at once, saying so in one line. ``--device cpu`` runs the same code
with tiny shapes on the CPU: a dry run of the script itself, not a check of anything.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

GREEDY_TOKENS = 24
NEAR_TIE = 0.02  # of the logit scale: bf16 differences in reduction order flip closer calls


class Check:
    def __init__(self, device: str, quick: bool) -> None:
        import torch

        self.torch = torch
        self.device = device
        self.quick = quick
        self.t0 = time.perf_counter()
        self.results: dict = {}
        self.dtype = "bfloat16" if device == "cuda" else "float32"

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def free(self) -> None:
        import gc

        gc.collect()
        if self.device == "cuda":
            self.torch.cuda.empty_cache()

    # -- models and engines ---------------------------------------------------------------------------------
    def weights(self, preset: str):
        from csps.dtypes import torch_dtype
        from csps.engine.weights import load_dummy

        return load_dummy(preset, torch_dtype(self.dtype), seed=0, device=self.device)

    def engine(self, preset: str, weights, max_model_len: int, kv_gib: float, token_budget: int = 8192, sp: int = 1):
        from csps.llm import create_engine, make_engine_config

        cfg = make_engine_config(model=f"dummy:{preset}", device=self.device, dtype=self.dtype,
                                 token_budget=token_budget, max_num_seqs=64, enable_prefix_caching=False,
                                 kv_cache_bytes=int(kv_gib * 2**30), sp=sp)
        return create_engine(cfg, max_model_len=max_model_len, weights=weights, load_tokenizer_=False)

    @staticmethod
    def run(engine, prompts: dict[str, list[int]], max_tokens: int) -> dict[str, list[int]]:
        from csps import SamplingParams

        params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
        for rid, ids in prompts.items():
            engine.add_request(ids, params, request_id=rid)
        out: dict[str, list[int]] = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    out[o.request_id] = o.token_ids
        return out

    def prompts(self, vocab: int, lengths: list[int], seed: int) -> dict[str, list[int]]:
        g = self.torch.Generator().manual_seed(seed)
        return {f"p{i}": self.torch.randint(3, vocab, (n,), generator=g).tolist() for i, n in enumerate(lengths)}

    # -- 2. greedy against transformers --------------------------------------------------------------------
    def greedy(self, preset: str) -> dict:
        from csps.bench.hf_export import hf_model

        cfg, sd = self.weights(preset)
        lengths = [17, 64, 130] if self.quick else [17, 64, 300, 1000]
        prompts = self.prompts(cfg.vocab_size, lengths, seed=1)
        engine = self.engine(preset, (cfg, sd), max_model_len=2048, kv_gib=2)
        engine.logits_sink = {}
        tokens = self.run(engine, prompts, GREEDY_TOKENS)
        ours = {rid: self.torch.stack(rows) for rid, rows in engine.logits_sink.items()}
        engine.shutdown()
        del engine  # its copies of the weights: transformers gets the originals
        self.free()
        model = hf_model(cfg, sd, self.dtype)
        worst = None
        for rid, ids in prompts.items():
            seq = self.torch.tensor([ids + tokens[rid]], device=self.device)
            with self.torch.inference_mode():
                ref = model(seq).logits[0, len(ids) - 1 : len(ids) - 1 + len(tokens[rid])].float()  # [N, V]
            want = ref.argmax(-1).tolist()
            scale = float(ref.abs().max())
            for step, (a, b) in enumerate(zip(tokens[rid], want)):
                if a != b:
                    top2 = ref[step].topk(2).values
                    ours_top2 = ours[rid][step].topk(2).values
                    margin = float(top2[0] - top2[1])
                    case = {"request": rid, "step": step, "csps": a, "transformers": b,
                            "transformers_margin": margin, "csps_margin": float(ours_top2[0] - ours_top2[1]),
                            "logit_scale": scale, "near_tie": margin <= NEAR_TIE * scale}
                    if worst is None or not case["near_tie"]:
                        worst = case
                    break
        del model, sd
        self.free()
        ok = worst is None or worst["near_tie"]
        res = {"prompts": len(prompts), "tokens_each": GREEDY_TOKENS, "equal": worst is None, "pass": ok,
               "first_divergence": worst}
        verdict = "equal" if worst is None else (
            f"diverge at {worst['request']} step {worst['step']}: transformers' top-2 margin "
            f"{worst['transformers_margin']:.4f}, csps' {worst['csps_margin']:.4f} (logit scale "
            f"{worst['logit_scale']:.2f}): {'a near-tie' if worst['near_tie'] else 'A REAL DIFFERENCE'}")
        self.say(f"greedy {preset}: {verdict}")
        return res

    # -- 3./4. TTFT and decode, with the cost model ---------------------------------------------------------
    def profile(self, name: str):
        from csps.perf.hardware import get_profile

        if name == "auto":
            gpu = self.torch.cuda.get_device_name() if self.device == "cuda" else ""
            name = "h200" if "H200" in gpu else "h100"
        return get_profile(name)

    def prefill_flops(self, cfg, n: int) -> float:
        emb = cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
        linear = 2 * (cfg.num_params() - emb) * n
        attention = 4 * n * (n / 2) * cfg.num_heads * cfg.head_dim * cfg.num_layers
        return linear + attention

    def ttft(self, hw, engine, cfg, n: int, budget: int, sp: int = 1) -> dict:
        from csps.bench.simulator import Strategy, simulate
        from csps.bench.workloads import RequestSpec

        prompt = self.prompts(cfg.vocab_size, [n], seed=2)
        t = time.perf_counter()
        self.run(engine, prompt, 1)
        ttft_s = time.perf_counter() - t
        strategy = Strategy("sp", sp=sp, token_budget=budget, adaptive_chunking=False)
        predicted = simulate([RequestSpec(prompt_len=n, output_len=1, arrival_s=0.0)], strategy, cfg, hw, 2
                             ).summary["ttft_s"]["mean"]
        tflops = self.prefill_flops(cfg, n) / ttft_s / 1e12
        res = {"tokens": n, "ttft_s": ttft_s, "predicted_s": predicted, "tflop_s": tflops,
               "peak_tflop_s": hw.peak_flops / 1e12, "mfu": tflops * 1e12 / hw.peak_flops, "sp": sp}
        self.say(f"TTFT {n // 1024}k (SP {sp}): {ttft_s:.2f} s (cost model {predicted:.2f} s), {tflops:.0f} TFLOP/s "
                 f"= {res['mfu']:.0%} of the {hw.name} bf16 peak")
        return res

    def decode(self, hw, engine, cfg, batch: int, context: int) -> dict:
        from csps.perf.cost_model import StepShape, predict_step

        first = len(engine.step_log)
        self.run(engine, self.prompts(cfg.vocab_size, [context] * batch, seed=3), 32)
        steps = [r.duration_s for r in list(engine.step_log)[first:] if r.num_decode_tokens == batch
                 and not r.num_prefill_tokens]
        tbt = statistics.median(steps)
        predicted = predict_step(StepShape(decodes=((context + 16, 1),) * batch), cfg, hw, 2).total_s
        self.say(f"decode batch {batch}, {context}-token contexts: TBT {tbt * 1e3:.1f} ms "
                 f"(cost model {predicted * 1e3:.1f} ms, median of {len(steps)} steps)")
        return {"batch": batch, "context": context, "tbt_ms": tbt * 1e3, "predicted_ms": predicted * 1e3,
                "steps": len(steps)}

    def llama3_8b(self, hw) -> None:
        preset = "tiny" if self.quick else "llama3-8b"
        lengths = [512, 2048] if self.quick else [32 * 1024, 128 * 1024]
        cfg, sd = self.weights(preset)
        budget = 512 if self.quick else 8192
        engine = self.engine(preset, (cfg, sd), max_model_len=max(lengths) + 64, kv_gib=0.2 if self.quick else 24,
                             token_budget=budget)
        del sd
        self.run(engine, self.prompts(cfg.vocab_size, [256], seed=9), 4)  # warm-up: kernels, allocator
        self.results["ttft"] = [self.ttft(hw, engine, cfg, n, budget) for n in lengths]
        ctx = 256 if self.quick else 1024
        self.results["decode"] = [self.decode(hw, engine, cfg, b, ctx) for b in (1, 32)]
        engine.shutdown()
        del engine
        self.free()

    def sp2(self, hw) -> None:
        gpus = self.torch.cuda.device_count() if self.device == "cuda" else 0
        if gpus < 2:
            reason = (f"SP 2 needs 2 GPUs: NCCL refuses two ranks on one device, and this machine has {gpus}"
                      if self.device == "cuda" else "SP 2 is checked on GPUs only")
            self.results["sp2"] = {"skipped": reason}
            self.say(f"SP 2: skipped ({reason})")
            return
        try:
            cfg, sd = self.weights("llama3-8b")
            engine = self.engine("llama3-8b", (cfg, {k: v.cpu() for k, v in sd.items()}), max_model_len=33 * 1024,
                                 kv_gib=8, sp=2)
            del sd
            self.results["sp2"] = self.ttft(hw, engine, cfg, 32 * 1024, 8192, sp=2)
            engine.shutdown()
        except Exception as e:  # noqa: BLE001 - reported, the rest of the check stands
            self.results["sp2"] = {"failed": f"{type(e).__name__}: {e}"}
            self.say(f"SP 2: failed ({type(e).__name__}: {str(e).splitlines()[0]})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hardware", default="auto", choices=["auto", "h100", "h200"],
                    help="cost-model profile for the predictions (auto: from the GPU's name)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"],
                    help="cpu: a dry run of this script with tiny shapes (checks nothing about GPUs)")
    a = ap.parse_args(argv)
    import torch

    if a.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available here (torch.cuda.is_available() is False); nothing checked",
              file=sys.stderr)
        return 1
    c = Check(a.device, quick=a.device == "cpu")
    from csps.kernels.cuda_attention import flash_available

    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": a.device,
           "gpu": torch.cuda.get_device_name() if a.device == "cuda" else None,
           "gpu_memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if a.device == "cuda" else None,
           "attention": "flash-attn" if flash_available() else "torch CUDA SDPA (flash / memory-efficient kernels)"}
    c.results["env"] = env
    c.say(f"{env['gpu'] or 'CPU dry run'}, torch {env['torch']} (CUDA {env['cuda']}), attention: {env['attention']}")
    hw = c.profile(a.hardware)
    c.results["hardware_profile"] = hw.name
    c.results["greedy"] = {p: c.greedy(p) for p in (["tiny"] if c.quick else ["smollm2-135m", "llama3-8b"])}
    c.llama3_8b(hw)
    c.sp2(hw)
    c.results["elapsed_s"] = time.perf_counter() - c.t0
    ok = all(g["pass"] for g in c.results["greedy"].values())
    c.say(f"{'PASS' if ok else 'FAIL'}: greedy comparison; done in {c.results['elapsed_s']:.0f} s")
    if a.json:
        os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
        with open(a.json, "w") as f:
            json.dump(c.results, f, indent=1, default=str)
    return 0 if ok else 2


if __name__ == "__main__":
    sys.exit(main())
