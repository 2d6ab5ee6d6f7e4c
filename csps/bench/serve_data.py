"""Prompts for ``csps bench serve``: the engine workloads (random, books, code; ``csps.bench.workloads``) plus
two datasets of ``vllm bench serve``:

- ``sharegpt``: a ShareGPT-format JSON file (``--dataset-path``): a list of ``{"conversations": [{"from":
  "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}``; the first turn is the prompt, the second
  sets the output length (unless ``--sharegpt-output-len``). As in vLLM, pairs with fewer than 4 prompt or
  output tokens, or (output length from the data) a prompt over 1024 or a total over 2048 tokens are skipped.
- ``prefix_repetition``: ``--prefix-repetition-num-prefixes`` random prefixes of ``-prefix-len`` tokens,
  each prompt one of them (in turn) followed by a random suffix of ``-suffix-len`` tokens: the prefix
  cache's workload.
"""

from __future__ import annotations

import json
import random

from csps.errors import CspsError

SERVE_DATASETS = ("sharegpt", "prefix_repetition")


def sharegpt_pairs(path: str) -> list[tuple[str, str]]:
    """(prompt, completion) of each conversation with at least two turns."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except OSError as e:
        raise CspsError(f"cannot read the ShareGPT file {path}: {e.strerror}") from None
    except json.JSONDecodeError as e:
        raise CspsError(f"{path} is not JSON: {e}") from None
    if not isinstance(data, list):
        raise CspsError(f"{path}: a ShareGPT file holds a JSON list of conversations")
    pairs = []
    for entry in data:
        turns = (entry.get("conversations") or entry.get("conversation")) if isinstance(entry, dict) else None
        if isinstance(turns, list) and len(turns) >= 2 and all(isinstance(t, dict) for t in turns[:2]):
            pairs.append((str(turns[0].get("value", "")), str(turns[1].get("value", ""))))
    if not pairs:
        raise CspsError(f"{path} has no conversation with two turns")
    return pairs


def sharegpt_lengths(pairs: list[tuple[str, str]], tokenizer, num_prompts: int, output_len: int | None,
                     seed: int) -> list[tuple[str, int, int]]:
    """(prompt text, prompt tokens, output tokens) of up to ``num_prompts`` valid pairs, shuffled."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out = []
    for i in order:
        prompt, completion = pairs[i]
        n_in = len(tokenizer.encode(prompt))
        n_out = output_len if output_len is not None else len(tokenizer.encode(completion))
        too_long = output_len is None and (n_in > 1024 or n_in + n_out > 2048)
        if n_in < 4 or n_out < 4 or too_long:
            continue
        out.append((prompt, n_in, n_out))
        if len(out) == num_prompts:
            break
    if not out:
        raise CspsError("no ShareGPT conversation has a usable length (4..1024 prompt tokens, 4+ output tokens)")
    return out


def prefix_repetition(tokenizer, num_prompts: int, prefix_len: int, suffix_len: int, num_prefixes: int,
                      seed: int) -> list[tuple[str, int]]:
    """(prompt text, prompt tokens): shared random prefixes, then a random suffix each."""
    rng = random.Random(seed)
    low, high = min(1000, tokenizer.vocab_size - 1), tokenizer.vocab_size - 1  # skip the special tokens

    def text(n: int) -> str:
        return tokenizer.decode([rng.randint(low, high) for _ in range(n)])

    prefixes = [text(prefix_len) for _ in range(max(1, num_prefixes))]
    return [(prefixes[i % len(prefixes)] + text(suffix_len), prefix_len + suffix_len) for i in range(num_prompts)]


def dataset_rows(a, tokenizer, n: int) -> list[tuple[str, int, int]]:
    """(prompt text, prompt tokens, output tokens) of ``n`` requests of ``a.dataset`` (one of SERVE_DATASETS)."""
    if a.dataset == "sharegpt":
        if not a.dataset_path:
            raise CspsError("--dataset sharegpt needs --dataset-path FILE.json")
        return sharegpt_lengths(sharegpt_pairs(a.dataset_path), tokenizer, n, a.sharegpt_output_len, a.seed)
    if a.dataset == "prefix_repetition":
        return [(t, n_in, a.prefix_repetition_output_len) for t, n_in in prefix_repetition(
            tokenizer, n, a.prefix_repetition_prefix_len, a.prefix_repetition_suffix_len,
            a.prefix_repetition_num_prefixes, a.seed)]
    raise CspsError(f"unknown serve dataset {a.dataset!r} ({' | '.join(SERVE_DATASETS)})")
