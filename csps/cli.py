"""The ``csps`` command: ``generate``, ``serve``, ``bench``.

Bad input gets one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys

from csps.cli_args import add_engine_args, engine_kwargs
from csps.errors import CspsError

log = logging.getLogger("csps.cli")


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

    from csps.bench.cli import add_bench_parser
    from csps.server.cli import add_serve_parser

    add_serve_parser(sub, add_engine_args)
    add_bench_parser(sub, add_engine_args)
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
