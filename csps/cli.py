"""The ``csps`` command: ``generate``, ``serve``, ``bench``.

Bad input gets one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from csps.errors import CspsError

log = logging.getLogger("csps.cli")


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


def add_engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    g.add_argument("--model", default="smollm2",
                   help="smollm2 (embedded default), a .gguf file, a Hugging Face directory, or dummy:<preset>")
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
    g.add_argument("--token-budget", type=parse_len, default=512, help="tokens per rank per step")
    g.add_argument("--max-model-len", type=parse_len, default=None, help="context limit (default: the model's)")
    g.add_argument("--max-num-seqs", type=int, default=256)
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-gb", type=float, default=None, help="KV cache per rank, GiB")
    g.add_argument("--no-prefix-caching", action="store_true")
    g.add_argument("--schedule-policy", default="stall-free", choices=["stall-free", "prefill-first"])
    g.add_argument("--seed", type=int, default=0)


def engine_kwargs(a: argparse.Namespace) -> dict:
    return dict(
        model=a.model, dtype=a.dtype, sp=a.sp, tp=a.tp, sp_attn=a.sp_attn, sp_exchange=a.sp_exchange,
        sp_threshold_tokens=a.sp_threshold, token_budget=a.token_budget, max_model_len=a.max_model_len,
        max_num_seqs=a.max_num_seqs, block_size=a.block_size,
        kv_cache_bytes=int(a.kv_cache_gb * 2**30) if a.kv_cache_gb else None,
        enable_prefix_caching=not a.no_prefix_caching, schedule_policy=a.schedule_policy, seed=a.seed,
    )


def cmd_generate(a: argparse.Namespace) -> int:
    from csps import SamplingParams
    from csps.llm import LLM

    prompt = a.prompt
    if a.file:
        try:
            with open(a.file, encoding="utf-8") as f:
                prompt = f.read() + ("\n\n" + a.prompt if a.prompt else "")
        except OSError as e:
            raise CspsError(f"cannot read {a.file}: {e.strerror}") from None
    elif prompt == "-":
        prompt = sys.stdin.read()
    if not prompt:
        raise CspsError("no prompt given (pass it as an argument, '-' for stdin, or --file)")
    params = SamplingParams(max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                            seed=a.seed, repetition_penalty=a.repetition_penalty)
    llm = LLM(**engine_kwargs(a))
    engine = llm.engine
    try:
        ids = (engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if a.chat
               else engine.tokenizer.encode(prompt))
        rid = engine.add_request(ids, params)
        final = None
        while engine.has_unfinished():
            for o in engine.step():
                if o.request_id == rid:
                    sys.stdout.write(o.new_text)
                    sys.stdout.flush()
                    final = o
        sys.stdout.write("\n")
        if final is not None and a.verbose:
            m = final.metrics
            tbt = sorted(m.tbt_s)
            p50 = tbt[len(tbt) // 2] * 1e3 if tbt else 0.0
            print(f"[{final.num_prompt_tokens} prompt tokens, {len(final.token_ids)} generated, "
                  f"TTFT {m.ttft_s:.2f} s, median TBT {p50:.1f} ms, finish: {final.finish_reason}]",
                  file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csps", description="Long-context LLM serving on CPU and GPU clusters.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    add_engine_args(g)
    g.add_argument("prompt", nargs="?", default="", help="the prompt ('-' reads stdin)")
    g.add_argument("--file", help="read the prompt (a document) from this file; the argument is appended")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    g.add_argument("-v", "--verbose", action="store_true", help="log progress and print timings")
    g.set_defaults(func=cmd_generate)

    try:
        from csps.server.cli import add_serve_parser

        add_serve_parser(sub, add_engine_args)
    except ImportError:
        pass
    try:
        from csps.bench_cli import add_bench_parser

        add_bench_parser(sub, add_engine_args)
    except ImportError:
        pass
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    verbose = getattr(args, "verbose", False) or args.command != "generate"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return args.func(args) or 0
    except CspsError as e:
        print(f"csps: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("csps: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
