"""Seeded benchmark workloads: prompts (random | books | code), output lengths and arrival times.

A workload is a list of ``RequestSpec``. Real runs (``csps bench``, ``csps bench serve``) carry token
ids or text; the simulator needs lengths only (``with_ids=False``). Datasets:

* ``random``: uniform random token ids (ids 0-2 are left out: BOS/EOS/pad in every preset);
* ``books``: the public-domain novels in ``../shared/data/books/`` (next to the repository), or a
  file or folder of ``.txt`` given as ``path``; windows start at seeded offsets and wrap around;
* ``code``: the Python standard library's source (``sysconfig.get_paths()["stdlib"]``), files in a
  seeded order, read only as far as the prompts need.

Arrivals: all at t = 0 (rate ``inf``), Poisson (exponential gaps) or fixed-rate. ``long_prompt_len``
adds one long request (tag ``"long"``) arriving at ``long_arrival_s`` among the others: the workload
where stall-free batching and prefill-first differ.
"""

from __future__ import annotations

import argparse
import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from csps.errors import CspsError

DATASETS = ("random", "books", "code")
ARRIVALS = ("poisson", "fixed")
FIRST_REGULAR_TOKEN_ID = 3  # 0-2: pad/BOS/EOS in SmolLM2's vocabulary (shared by every preset)
CHARS_PER_TOKEN_GUESS = 5  # generous: only used to decide how much text to read


class Encoder(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclass(frozen=True)
class RequestSpec:
    """One request of a workload; ``prompt_ids`` is None for length-only (simulated) workloads."""

    prompt_len: int
    output_len: int
    arrival_s: float = 0.0
    tag: str = ""
    prompt_ids: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.prompt_len < 1 or self.output_len < 1:
            raise CspsError(f"prompt and output lengths must be >= 1 (got {self.prompt_len}, {self.output_len})")
        if not self.arrival_s >= 0:
            raise CspsError(f"arrival time must be >= 0, got {self.arrival_s}")
        if self.prompt_ids is not None and len(self.prompt_ids) != self.prompt_len:
            raise CspsError(f"prompt has {len(self.prompt_ids)} ids but prompt_len is {self.prompt_len}")


@dataclass(frozen=True)
class WorkloadConfig:
    dataset: str = "random"
    num_prompts: int = 1
    prompt_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0  # lengths uniform in [L * (1 - r), L * (1 + r)] (vllm's --random-range-ratio)
    request_rate_per_s: float = math.inf  # inf: every request arrives at t = 0
    arrival: str = "poisson"  # poisson | fixed
    long_prompt_len: int | None = None  # add one long prompt arriving among the others
    long_output_len: int = 16
    long_arrival_s: float = 1.0
    path: str | None = None  # books: a .txt file or a folder of them
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise CspsError(f"unknown dataset {self.dataset!r} ({' | '.join(DATASETS)})")
        if self.arrival not in ARRIVALS:
            raise CspsError(f"unknown arrival process {self.arrival!r} ({' | '.join(ARRIVALS)})")
        if self.num_prompts < 0 or (self.num_prompts == 0 and self.long_prompt_len is None):
            raise CspsError("a workload needs at least one request")
        if self.prompt_len < 1 or self.output_len < 1 or self.long_output_len < 1:
            raise CspsError("prompt and output lengths must be >= 1")
        if not 0 <= self.range_ratio < 1:
            raise CspsError(f"range ratio must be in [0, 1), got {self.range_ratio}")
        if not self.request_rate_per_s > 0:
            raise CspsError(f"request rate must be positive (inf for all at once), got {self.request_rate_per_s}")
        if self.long_prompt_len is not None and (self.long_prompt_len < 1 or self.long_arrival_s < 0):
            raise CspsError("the long prompt needs a positive length and an arrival time >= 0")

    @property
    def max_prompt_len(self) -> int:
        longest = int(self.prompt_len * (1 + self.range_ratio)) if self.num_prompts else 0
        return max(longest, self.long_prompt_len or 0)

    @property
    def total_prompt_tokens_upper_bound(self) -> int:
        return int(self.num_prompts * self.prompt_len * (1 + self.range_ratio)) + (self.long_prompt_len or 0)


def arrival_times(n: int, rate_per_s: float, process: str = "poisson", seed: int = 0) -> list[float]:
    """Arrival times (s) of n requests: all 0 for rate inf, else Poisson or evenly spaced."""
    if process not in ARRIVALS:
        raise CspsError(f"unknown arrival process {process!r} ({' | '.join(ARRIVALS)})")
    if math.isinf(rate_per_s):
        return [0.0] * n
    rng = random.Random(seed)
    t, out = 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate_per_s) if process == "poisson" else 1.0 / rate_per_s
    return out


def _lengths(n: int, mean: int, ratio: float, rng: random.Random) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def default_books_dir() -> Path:
    """``../shared/data/books`` relative to the repository holding the ``csps`` package."""
    return Path(__file__).resolve().parents[3] / "shared" / "data" / "books"


def book_text(path: str | None = None) -> str:
    """The text of a book file, or of every ``.txt`` in a folder (sorted), joined by blank lines."""
    where = Path(path) if path else default_books_dir()
    if where.is_file():
        files = [where]
    elif where.is_dir():
        files = sorted(where.glob("*.txt"))
    else:
        files = []
    if not files:
        hint = "pass --dataset-path FILE_OR_DIR" if not path else "check the path"
        raise CspsError(f"no books found at {where} (the books dataset reads .txt files; {hint})")
    return "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)


def code_text(min_chars: int, seed: int = 0) -> str:
    """Python standard-library source, files in a seeded order, until ``min_chars`` are read."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    if not files:
        raise CspsError(f"no Python sources found under {root} for the code dataset")
    random.Random(seed).shuffle(files)
    parts, n = [], 0
    for f in files:
        try:
            text = f.read_text(encoding="utf-8", errors="replace")
        except OSError:
            continue
        parts.append(f"# file: {f.relative_to(root)}\n{text}")
        n += len(parts[-1])
        if n >= min_chars:
            break
    return "\n".join(parts)


def text_windows(ids: list[int], lengths: list[int], rng: random.Random) -> list[list[int]]:
    """One window per length at a seeded offset; the text wraps around when it is too short."""
    if not ids:
        raise CspsError("the dataset text tokenized to nothing")
    out = []
    for n in lengths:
        start = rng.randrange(len(ids))
        reps = -(-(start + n) // len(ids))
        out.append((ids * reps)[start : start + n] if reps > 1 else ids[start : start + n])
    return out


def _prompt_ids(cfg: WorkloadConfig, lengths: list[int], rng: random.Random, tokenizer: Encoder | None,
                vocab_size: int | None) -> list[list[int]]:
    if cfg.dataset == "random":
        if vocab_size is None or vocab_size <= FIRST_REGULAR_TOKEN_ID:
            raise CspsError("the random dataset needs the vocabulary size")
        return [[rng.randrange(FIRST_REGULAR_TOKEN_ID, vocab_size) for _ in range(n)] for n in lengths]
    if tokenizer is None:
        raise CspsError(f"the {cfg.dataset} dataset needs a tokenizer")
    if cfg.dataset == "books":  # a seeded rotation of the books, cut to what the prompts can use
        text = book_text(cfg.path)
        cut = rng.randrange(len(text))
        text = (text[cut:] + "\n\n" + text[:cut])[: (sum(lengths) + 1024) * CHARS_PER_TOKEN_GUESS]
    else:
        text = code_text(min(sum(lengths), 4 << 20) * CHARS_PER_TOKEN_GUESS, cfg.seed)
    return text_windows(tokenizer.encode(text), lengths, rng)


def make_workload(cfg: WorkloadConfig, *, with_ids: bool = True, tokenizer: Encoder | None = None,
                  vocab_size: int | None = None) -> list[RequestSpec]:
    """The requests of ``cfg``, sorted by arrival. ``with_ids=False``: lengths only (simulation)."""
    rng = random.Random(cfg.seed)
    lengths = _lengths(cfg.num_prompts, cfg.prompt_len, cfg.range_ratio, rng)
    outputs = _lengths(cfg.num_prompts, cfg.output_len, cfg.range_ratio, rng)
    arrivals = arrival_times(cfg.num_prompts, cfg.request_rate_per_s, cfg.arrival, cfg.seed + 1)
    tags = [""] * cfg.num_prompts
    if cfg.long_prompt_len is not None:
        lengths.append(cfg.long_prompt_len)
        outputs.append(cfg.long_output_len)
        arrivals.append(cfg.long_arrival_s)
        tags.append("long")
    ids: list[list[int] | None] = [None] * len(lengths)
    if with_ids:
        ids = _prompt_ids(cfg, lengths, rng, tokenizer, vocab_size)
    specs = [RequestSpec(n, o, a, tag, tuple(i) if i is not None else None)
             for n, o, a, tag, i in zip(lengths, outputs, arrivals, tags, ids)]
    return sorted(specs, key=lambda s: s.arrival_s)


# --- from ``csps bench`` flags ----------------------------------------------------------------------

def workload_config(a: argparse.Namespace, default_prompts: int = 1) -> WorkloadConfig:
    return WorkloadConfig(
        dataset=a.dataset, num_prompts=a.num_prompts if a.num_prompts is not None else default_prompts,
        prompt_len=a.prompt_len, output_len=a.output_len, range_ratio=a.range_ratio,
        request_rate_per_s=a.request_rate, arrival=a.arrival, long_prompt_len=a.long_prompt_len,
        long_output_len=a.long_output_len, long_arrival_s=a.long_arrival, path=a.dataset_path,
        seed=getattr(a, "seed", 0))


def workload_from_args(a, tokenizer=None, vocab_size=None, with_ids=True) -> list[RequestSpec]:
    return make_workload(workload_config(a), with_ids=with_ids, tokenizer=tokenizer, vocab_size=vocab_size)


def workload_dict(a) -> dict:
    from dataclasses import asdict

    return asdict(workload_config(a))
