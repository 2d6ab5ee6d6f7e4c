"""The engine's command-line flags, shared by ``csps generate``, ``csps serve`` and ``csps bench``
(a module of its own so the subcommands import it, not each other)."""

from __future__ import annotations

import argparse


def parse_len(text: str) -> int:
    """Token counts with suffixes: '512', '16k' (16·1024), '1M' (1024²)."""
    t = text.strip()
    mult = 1
    if t[-1:] in ("k", "K"):
        mult, t = 1024, t[:-1]
    elif t[-1:] in ("m", "M"):
        mult, t = 1024 * 1024, t[:-1]
    try:
        value = int(float(t) * mult)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a length: {text!r} (examples: 512, 16k, 1M)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"length must be positive: {text!r}")
    return value


def parse_time_budget(text: str) -> str | float:
    t = text.strip().lower()
    if t in ("auto", "off"):
        return t
    try:
        value = float(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a step time budget: {text!r} (auto, off or milliseconds)") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"the step time budget must be positive: {text!r}")
    return value


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2",
                   help="smollm2 (embedded default), a .gguf file, a Hugging Face directory, or dummy:<preset>")
    g.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: cuda where a CUDA GPU is available (rank r uses cuda:LOCAL_RANK), else cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                   help="auto: bfloat16 where the CPU/GPU computes it natively, else float32")
    g.add_argument("--sp", type=int, default=1, help="sequence-parallel ranks")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    g.add_argument("--sp-attn", default="ring", choices=["ring", "ulysses"],
                   help="prefill exchange for sequence-parallel prompts")
    g.add_argument("--sp-exchange", default="auto", choices=["auto", "pass_kv", "pass_q"],
                   help="ring prefill exchange: auto picks per chunk (Meta's rule, calibrated at start-up)")
    g.add_argument("--sp-threshold", type=parse_len, default=4096,
                   help="prompts longer than this run sequence-parallel")
    g.add_argument("--token-budget", type=parse_len, default=None,
                   help="tokens per rank per step (default: 1024 on CPU, 512 on CUDA)")
    g.add_argument("--step-time-budget-ms", type=parse_time_budget, default="auto", metavar="auto|off|MS",
                   help="size prefill chunks so a step's predicted time stays within this budget (the token "
                        "budget stays an upper bound); auto: the time of the step's decodes plus the fresh "
                        "chunk the token budget leaves them, so chunks on a long cache shrink; off: the token budget "
                        "alone")
    g.add_argument("--max-model-len", type=parse_len, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache per rank, GiB")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--schedule-policy", default="stall-free", choices=["stall-free", "prefill-first"])
    g.add_argument("--seed", type=int, default=0)


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model, device=a.device, dtype=a.dtype, sp=a.sp, tp=a.tp, sp_attn=a.sp_attn, sp_exchange=a.sp_exchange,
        sp_threshold_tokens=a.sp_threshold, token_budget=a.token_budget, max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs, block_size=a.block_size,
        kv_cache_bytes=int(a.kv_cache_gb * 2**30) if a.kv_cache_gb else None,
        enable_prefix_caching=not a.no_prefix_caching, schedule_policy=a.schedule_policy, seed=a.seed,
        adaptive_chunking=a.step_time_budget_ms != "off",
        step_time_budget_ms=a.step_time_budget_ms if isinstance(a.step_time_budget_ms, float) else None,
    )
