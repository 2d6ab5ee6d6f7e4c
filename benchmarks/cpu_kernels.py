"""The CPU kernel choices behind the engine's fast paths, each measured side by side in one run.

  head    the vocabulary projection (SmolLM2: V = 49,152, H = 576) for 1-256 rows: the [V, H] layout
          (W @ h^T, used for 2-256 rows) vs the transposed [H, V] copy (h @ W_t, used for 1 row)
  linear  every linear layer of SmolLM2 (30 layers) for 1-512 rows in the engine's dtype: the C++ few-rows
          kernel vs F.linear(x, W) vs (W @ x^T)^T vs csps.kernels.linear's dispatch, alternating
  zigzag  attention of rank 0's zigzag share of a 4,096-token chunk at P = 2 (2,048 queries on top of 8k
          cached tokens, 1 thread) over the ring's KV blocks: the engine's placement (pieces of one
          16-token KV block: query tiles, and a sweep of the tile size) and two pieces per rank (runs of
          consecutive positions), each vs one dense masked pass
  decode  decode attention over the paged cache for a step (30 layers), batches 1/8/32 of 560 tokens in
          shuffled blocks: the C++ kernel (blocks read in place) vs its plain-torch twin (gather + attention)
  decode_long  the same at 8k context, batches 1/4/8
  decode_layers  the C++ kernel alone for a batch-32 step at 560 tokens with 30 distinct layers' caches (as a
          step reads them: ~410 MB of bf16 KV, not cache-resident), blocks consecutive and shuffled
  prefill attention of a prefill chunk over its sequence's prefix (SmolLM2's heads, 30 layers): the C++ kernel
          vs torch's CPU flash kernel (attention_torch), fp32 and bf16, fresh chunks and chunks on a cache
  prefill_avx2  the same kernel built for AVX2 (-mno-avx512f) against torch's flash kernel at
          ATEN_CPU_CAPABILITY=avx2, in a child process on this CPU: the check behind kernels/prefill.py's CAPABILITIES
  sample  drawing one token per row of [rows, 49,152] probabilities: the exponential race (argmax p/E),
          torch.multinomial, and csps' sampler (inverse CDF), 1/8/32 rows
  step    the engine's decode-only step for SmolLM2 at batches 1/8/32 (512-token prompts)

Run: .venv/bin/python benchmarks/cpu_kernels.py [head linear zigzag decode decode_long decode_layers prefill
     prefill_avx2 sample step]   (~6 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save, table  # noqa: E402
from csps.kernels import attention_torch  # noqa: E402

from csps.presets import preset_config  # noqa: E402

M = preset_config("smollm2-135m")


def ms(fn, reps: int = 10) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def bench_head() -> dict:
    w = torch.randn(M.vocab_size, M.hidden_size)  # [V, H]
    w_t = w.t().contiguous()  # [H, V]
    out = {}
    for rows in (1, 2, 8, 32, 256):
        h = torch.randn(rows, M.hidden_size)
        natural = ms(lambda: torch.mm(w, h.t()).t().contiguous())
        transposed = ms(lambda: h @ w_t)
        out[rows] = {"natural_ms": natural, "transposed_ms": transposed, "transposed_over_natural": transposed / natural}
    return out


def bench_linear() -> dict:
    """Every linear layer of SmolLM2 (30 layers of distinct weights, as a step streams them) for 1-512 rows in the
    engine's dtype, each way ``csps.kernels.linear`` can run it on W [out, in]: the C++ few-rows kernel (up to 32
    rows), F.linear(x, W), (W @ x^T)^T, and the dispatch itself; alternating, 5 rounds, medians."""
    import torch.nn.functional as F

    from csps.device import resolve_dtype
    from csps.kernels.linear import linear, max_kernel_rows

    dtype = getattr(torch, resolve_dtype("auto", "cpu"))
    hid, inter, d = M.hidden_size, M.intermediate_size, M.head_dim
    shapes = [((M.num_heads + 2 * M.num_kv_heads) * d, hid), (hid, M.num_heads * d), (2 * inter, hid), (hid, inter)]
    layers = [[torch.randn(o, i, dtype=dtype) for o, i in shapes] for _ in range(M.num_layers)]  # [out, in]
    ways = {"kernel_ms": lambda x: [torch.ops.csps.linear_rows(x[w.shape[1]], w, None) for ws in layers for w in ws],
            "f_linear_ms": lambda x: [F.linear(x[w.shape[1]], w) for ws in layers for w in ws],
            "w_at_x_t_ms": lambda x: [torch.mm(w, x[w.shape[1]].t()).t().contiguous() for ws in layers for w in ws],
            "dispatch_ms": lambda x: [linear(x[w.shape[1]], w) for ws in layers for w in ws]}
    out = {"dtype": str(dtype), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "max_kernel_rows": max_kernel_rows(dtype)}
    for rows in (1, 2, 4, 8, 16, 32, 128, 512):
        x = {i: torch.randn(rows, i, dtype=dtype) for _, i in shapes}
        times: dict[str, list[float]] = {k: [] for k in ways if k != "kernel_ms" or rows <= 32}
        for _ in range(5):
            for k in times:
                times[k].append(ms(lambda: ways[k](x), reps=2))
        out[rows] = {k: statistics.median(v) for k, v in times.items()}
        print("linear", rows, {k: round(v, 1) for k, v in out[rows].items()}, flush=True)
    return out


def _zigzag_case(q_pos, k_pos_by_block, fast: dict, slow: dict) -> dict:
    """attention_torch() of q_pos over each block of keys with the path settings ``fast`` vs ``slow``."""
    q = torch.randn(q_pos.shape[0], M.num_heads, M.head_dim)
    out = {}
    for name, k_pos in k_pos_by_block.items():
        k, v = torch.randn(k_pos.shape[0], M.num_kv_heads, M.head_dim), torch.randn(k_pos.shape[0], M.num_kv_heads, M.head_dim)
        timed = {}
        for label, settings in (("fast", fast), ("slow", slow)):
            timed[label] = ms(lambda: attention_torch(q, k, v, q_pos, k_pos, **settings), reps=3)
        out[name] = {"fast_ms": timed["fast"], "masked_ms": timed["slow"], "masked_over_fast": timed["slow"] / timed["fast"]}
    return out


def bench_zigzag(chunk: int = 4096, cached: int = 8192, block: int = 16) -> dict:
    """One thread, as each rank of SP 2 on this 2-core machine runs."""
    from csps.core import kv_placement as kp
    from csps.core.plan import ranges_to_list

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        dense = {"max_run_pairs": 0, "q_tile": 0}  # one masked pass over the keys not seen by every query
        # the engine's placement: pieces of one KV block; rank 0's share of the chunk over the ring's two
        # blocks: the chunk's keys only, and with the rank's cached share (seen whole by every query)
        share = lambda r, a, b: torch.tensor(ranges_to_list(kp.ranges_per_rank(a, b, 2, block)[r]))  # noqa: E731
        q_pos = share(0, cached, cached + chunk)
        blocks = {"own_share": share(0, cached, cached + chunk), "other_share": share(1, cached, cached + chunk),
                  "own_share_and_cache": share(0, 0, cached + chunk)}
        granular = _zigzag_case(q_pos, blocks, fast={}, slow=dense)
        sweep = {t: _zigzag_case(q_pos, {"own_share": blocks["own_share"]}, fast={"q_tile": t}, slow=dense)
                 ["own_share"]["fast_ms"] for t in (64, 128, 256, 512, 1024)}
        # two pieces per rank (ring-flash-attn's layout): runs of consecutive positions
        n = chunk // 4
        piece = lambda i: torch.arange(cached + n * i, cached + n * (i + 1))  # noqa: E731
        q_pos = torch.cat([piece(0), piece(3)])
        two = _zigzag_case(q_pos, {"own_share": q_pos, "other_share": torch.cat([piece(1), piece(2)])},
                           fast={}, slow=dense)
    finally:
        torch.set_num_threads(threads)
    return {"granular_block16": granular, "two_pieces": two, "q_tile_sweep_ms": sweep, "threads": 1}


def _paged_case(batch: int, ctx: int, bs: int = 16, seed: int = 0):
    """A paged cache holding ``batch`` sequences of ``ctx`` tokens in shuffled blocks (as decodes interleave)."""
    g = torch.Generator().manual_seed(seed)
    nblk = -(-ctx // bs)
    kc = torch.randn(batch * nblk + 1, bs, M.num_kv_heads, M.head_dim, generator=g)
    vc = torch.randn(batch * nblk + 1, bs, M.num_kv_heads, M.head_dim, generator=g)
    tables = (torch.randperm(batch * nblk, generator=g) + 1).view(batch, nblk).int()
    q = torch.randn(batch, M.num_heads, M.head_dim, generator=g)
    return q, kc, vc, tables, torch.arange(batch), torch.full((batch,), ctx)


def _decode_kernel_vs_twin(batches, ctx: int) -> dict:
    """Decode attention of a step (30 layers): the C++ kernel reading blocks in place vs its plain-torch
    twin (gather into a padded batch, then fp32 attention)."""
    from csps.kernels import cpu_ext
    from csps.kernels.decode import HeadGroups, paged_decode, paged_decode_torch

    if not cpu_ext.available():
        raise SystemExit(f"the C++ CPU kernels are unavailable: {cpu_ext.load()}")
    heads = HeadGroups.of(M.num_heads, M.num_kv_heads)
    out = {}
    for b in batches:
        q, kc, vc, tables, rows, lens = _paged_case(b, ctx)
        args = (q, kc, vc, tables, rows, lens, ctx, heads, M.head_dim**-0.5)
        kernel = ms(lambda: paged_decode(*args)) * M.num_layers
        twin = ms(lambda: paged_decode_torch(*args), reps=3) * M.num_layers
        out[b] = {"kernel_ms_per_step": kernel, "torch_twin_ms_per_step": twin, "twin_over_kernel": twin / kernel}
    return out


def bench_decode() -> dict:
    return _decode_kernel_vs_twin((1, 8, 32), ctx=560)


def bench_decode_long() -> dict:
    return _decode_kernel_vs_twin((1, 4, 8), ctx=8192)


def bench_decode_layers(batch: int = 32, ctx: int = 560, bs: int = 16) -> dict:
    """The paged decode kernel for one step of ``batch`` decodes at ``ctx`` tokens over 30 layers, each with its
    own bf16 cache (a step's KV does not fit in the CPU's caches), best of 3 rounds of 5 steps."""
    from csps.kernels.decode import HeadGroups, paged_decode

    heads = HeadGroups.of(M.num_heads, M.num_kv_heads)
    nblk = -(-ctx // bs)
    shape = (batch * nblk + 1, bs, M.num_kv_heads, M.head_dim)
    out = {"dtype": "bfloat16", "batch": batch, "ctx": ctx}
    for layout in ("consecutive", "shuffled"):
        kcs = [torch.randn(shape).bfloat16() for _ in range(M.num_layers)]
        vcs = [torch.randn(shape).bfloat16() for _ in range(M.num_layers)]
        ids = torch.arange(batch * nblk) if layout == "consecutive" else torch.randperm(batch * nblk)
        tables = (ids + 1).view(batch, nblk).int()
        q = torch.randn(batch, M.num_heads, M.head_dim).bfloat16()
        rows, lens = torch.arange(batch), torch.full((batch,), ctx)

        def step():
            for layer in range(M.num_layers):
                paged_decode(q, kcs[layer], vcs[layer], tables, rows, lens, ctx, heads, M.head_dim**-0.5)

        best = min(ms(step, reps=5) for _ in range(3))
        kv_bytes = 2 * M.num_layers * batch * ctx * M.num_kv_heads * M.head_dim * 2
        out[layout] = {"ms_per_step": best, "kv_gb_s": kv_bytes / best / 1e6}
    return out


def bench_prefill() -> dict:
    """Attention of one prefill chunk (Tq queries at the end of Tk keys) for a step's 30 layers: the C++ kernel vs
    the plain-torch path it replaces (torch's CPU flash attention, split at the cache), alternating, 3 rounds,
    best of each; q as the engine has it (a view into the fused qkv rows)."""
    from csps.kernels.prefill import prefill_attention

    h, hkv, d = M.num_heads, M.num_kv_heads, M.head_dim
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        for tq, tk in ((512, 512), (1024, 1024), (1024, 4096), (64, 4096), (1024, 8192)):
            qkv = torch.randn(tq, (h + 2 * hkv) * d).to(dtype)
            q = qkv[:, : h * d].view(tq, h, d)
            k, v = torch.randn(tk, hkv, d).to(dtype), torch.randn(tk, hkv, d).to(dtype)
            q_pos, k_pos = torch.arange(tk - tq, tk), torch.arange(tk)
            kernel, twin = [], []
            for _ in range(3):
                kernel.append(ms(lambda: prefill_attention(q, k, v, tk - tq, d**-0.5), reps=3) * M.num_layers)
                twin.append(ms(lambda: attention_torch(q, k, v, q_pos, k_pos), reps=3) * M.num_layers)
            flop = 4 * h * d * (tq * (tk - tq) + tq * tq / 2) * M.num_layers  # the visible (causal) part
            out[f"{str(dtype)[6:]} {tq}x{tk}"] = {
                "kernel_ms_per_step": min(kernel), "torch_ms_per_step": min(twin),
                "torch_over_kernel": min(twin) / min(kernel), "kernel_tflop_s": flop / min(kernel) / 1e9}
    return out


_AVX2_CHILD = r"""
import json, os, sys, tempfile, time
import torch
from torch.utils import cpp_extension
from csps.kernels import cpu_ext
from csps.kernels.attention_torch import attention_torch
d = tempfile.mkdtemp()
cpp_extension.load(name="csps_cpu_kernels_avx2", sources=[os.path.join(cpu_ext.CSRC, s) for s in cpu_ext.SOURCES],
                   extra_cflags=list(cpu_ext.CFLAGS) + ["-mno-avx512f"], extra_ldflags=["-fopenmp"],
                   build_directory=d, is_python_module=False)
def ms(fn, reps=3):
    fn(); t = time.perf_counter()
    for _ in range(reps): fn()
    return (time.perf_counter() - t) / reps * 1e3
out = {"torch_capability": torch.backends.cpu.get_cpu_capability()}
for dtype in (torch.float32, torch.bfloat16):
    for tq, tk in ((512, 512), (1024, 4096)):
        q, k, v = (torch.randn(n, h, 64).to(dtype) for n, h in ((tq, 9), (tk, 3), (tk, 3)))
        qp, kp = torch.arange(tk - tq, tk), torch.arange(tk)
        kernel = min(ms(lambda: torch.ops.csps.prefill_attention(q, k, v, tk - tq, 0.125, True)) for _ in range(3))
        twin = min(ms(lambda: attention_torch(q, k, v, qp, kp)) for _ in range(3))
        out[f"{str(dtype)[6:]} {tq}x{tk}"] = {"kernel_ms": kernel, "torch_ms": twin, "torch_over_kernel": twin / kernel}
print(json.dumps(out))
"""


def bench_prefill_avx2() -> dict:
    """The prefill kernel as an AVX2 CPU would build it, against torch's AVX2 flash kernel, one layer (a child
    process: torch's kernel choice is fixed at start by ATEN_CPU_CAPABILITY; the build goes to a temporary folder)."""
    import subprocess

    env = dict(os.environ, ATEN_CPU_CAPABILITY="avx2", PYTHONSAFEPATH="1")
    r = subprocess.run([sys.executable, "-c", _AVX2_CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(r.stdout.strip().splitlines()[-1])


def bench_sample(vocab: int = 49152) -> dict:
    """One token per row from softmax probabilities: an exponential race, torch.multinomial and csps' sampler
    (temperature 1, no filters), each over the same logits."""
    from csps.core.sampling_params import SamplingParams
    from csps.engine.sampler import SampleRow, sample

    out = {}
    for rows in (1, 8, 32):
        logits = torch.randn(rows, vocab) * 3
        probs = torch.softmax(logits, -1)
        params = [SampleRow(SamplingParams(temperature=1.0), [], []) for _ in range(rows)]
        ways = {"exponential_race_ms": lambda: (probs / torch.empty_like(probs).exponential_()).argmax(-1),
                "multinomial_ms": lambda: torch.multinomial(probs, 1),
                "csps_sampler_ms": lambda: sample(logits.clone(), params)}
        out[rows] = {k: min(ms(f, reps=10) for _ in range(3)) for k, f in ways.items()}
    return out


def bench_step(prompt_len: int = 512, num_decode_steps: int = 24) -> dict:
    from csps import LLM, SamplingParams

    llm = LLM("smollm2", token_budget=512, max_num_seqs=64, enable_prefix_caching=False)
    engine = llm.engine
    out = {"dtype": engine.config.dtype}
    for b in (1, 8, 32):
        # long enough that every request is still decoding once the last prompt is prefilled
        params = SamplingParams(max_tokens=2 * b + num_decode_steps, temperature=0, ignore_eos=True)
        for i in range(b):
            engine.add_request([5 + (i * 7 + j) % 40000 for j in range(prompt_len)], params)
        first = len(engine.step_log)
        while engine.has_unfinished():
            engine.step()
        steps = [r.duration_s for r in list(engine.step_log)[first:]
                 if r.num_decode_tokens == b and not r.num_prefill_tokens]
        out[b] = {"decode_step_ms_median": statistics.median(steps) * 1e3, "steps": len(steps)}
        print("step", b, out[b], flush=True)
    llm.shutdown()
    return out


PARTS = {"head": bench_head, "linear": bench_linear, "zigzag": bench_zigzag, "decode": bench_decode,
         "decode_long": bench_decode_long, "decode_layers": bench_decode_layers, "prefill": bench_prefill,
         "prefill_avx2": bench_prefill_avx2, "sample": bench_sample,
         "step": bench_step}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("parts", nargs="*", default=list(PARTS), help=" ".join(PARTS))
    args = ap.parse_args()
    if unknown := [p for p in args.parts if p not in PARTS]:
        ap.error(f"unknown part(s) {unknown}; choose from {list(PARTS)}")
    from csps.device import cpu_binding
    from csps.kernels import cpu_ext

    cpus = cpu_binding(0, 1, torch.get_num_threads())
    if cpus is not None:  # pinned as an engine's threads are
        cpu_ext.bind_threads(cpus)
    res = {}
    for p in args.parts:
        res[p] = PARTS[p]()
        print(p, res[p], flush=True)
    name = "cpu_kernels" if set(args.parts) == set(PARTS) else "cpu_kernels_" + "_".join(args.parts)
    print("wrote", save(name, {"threads": torch.get_num_threads(), **res}))
    if "linear" in res:
        print(table([(r, f"{v['kernel_ms']:.1f}" if "kernel_ms" in v else "-", f"{v['f_linear_ms']:.1f}",
                       f"{v['w_at_x_t_ms']:.1f}", f"{v['dispatch_ms']:.1f}")
                     for r, v in res["linear"].items() if isinstance(r, int)],
                    ("rows", "C++ kernel ms", "F.linear(x, W) ms", "(W @ x^T)^T ms", "dispatch ms")))
    if "head" in res:
        print(table([(r, f"{v['natural_ms']:.2f}", f"{v['transposed_ms']:.2f}", f"{v['transposed_over_natural']:.1f}x")
                     for r, v in res["head"].items()], ("rows", "[V, H] ms", "[H, V] ms", "ratio")))
    if "zigzag" in res:
        print(table([(lay, k, f"{v['fast_ms']:.0f}", f"{v['masked_ms']:.0f}", f"{v['masked_over_fast']:.2f}x")
                     for lay, blocks in res["zigzag"].items() if lay in ("granular_block16", "two_pieces")
                     for k, v in blocks.items()],
                    ("layout", "keys", "tiles/runs ms", "masked ms", "ratio")))
        print(table([(t, f"{v:.0f}") for t, v in res["zigzag"]["q_tile_sweep_ms"].items()], ("Q_TILE", "own share ms")))
    if "prefill" in res:
        print(table([(c, f"{v['kernel_ms_per_step']:.1f}", f"{v['torch_ms_per_step']:.1f}", f"{v['torch_over_kernel']:.2f}x",
                      f"{v['kernel_tflop_s']:.2f}") for c, v in res["prefill"].items()],
                    ("dtype Tq x Tk", "C++ kernel ms/step", "torch flash ms/step", "ratio", "kernel TFLOP/s")))
    for part in ("decode", "decode_long"):
        if part in res:
            print(table([(b, f"{v['kernel_ms_per_step']:.1f}", f"{v['torch_twin_ms_per_step']:.1f}",
                          f"{v['twin_over_kernel']:.1f}x") for b, v in res[part].items()],
                        ("batch", "C++ kernel ms/step", "torch twin ms/step", "ratio")))


if __name__ == "__main__":
    main()
