"""Summarizing a long document: one long-context pass when it fits, else hierarchical map-reduce.

Map-reduce cuts the document on paragraph boundaries into chunks that fit the context next to
the instructions and a chunk summary, summarizes the chunks concurrently (they batch in the
engine), and repeats on the joined summaries until they fit one final pass. Instructions always
come after the text they refer to (the model reads the document first, and documents that share
a prefix share the prefix cache). Token counts come from the engine's tokenizer.
"""

from __future__ import annotations

import asyncio
import re
import time

from csps.server.errors import APIError, bad_request
from csps.server.prompt_progress import progress_body
from csps.server.protocol import SummarizeRequest

INSTRUCTIONS = ("Write a summary of the document above in a few paragraphs. Cover the main people, events, "
                "arguments and conclusions in the order they appear. Do not add anything that is not in it.")
CHUNK_INSTRUCTIONS = ("The text above is one consecutive part of a longer document. Summarize this part "
                      "concisely; keep the names, events and facts it contains, in order.")
MERGE_INSTRUCTIONS = ("The text above is a sequence of summaries of consecutive parts of one document. Merge "
                      "them into one shorter summary that keeps the main names, events and facts, in order.")
MARGIN_TOKENS = 8  # slack for tokens merging differently across the joins of pieces
MAX_LEVELS = 8
RETRY_429_S = 120.0


def split_paragraphs(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]


def split_evenly(text: str, k: int) -> list[str]:
    """``text`` in ``k`` pieces of similar length, cut at whitespace when possible."""
    out, start = [], 0
    for i in range(1, k):
        target = len(text) * i // k
        cut = text.rfind(" ", start + 1, target + 1)
        cut = target if cut <= start else cut
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return [p.strip() for p in out if p.strip()]


async def max_summary_tokens(client, limit: int) -> int:
    """The largest max_tokens a request with the default instructions may ask for (see Summarizer.run)."""
    overhead = (await client.rpc("count", messages_list=[messages("", INSTRUCTIONS)]))["counts"][0]
    return max(1, limit - overhead - MARGIN_TOKENS - 1)


def messages(body: str, instruction: str) -> list[dict]:
    return [{"role": "user", "content": f"{body}\n\n{instruction}"}]


class Summarizer:
    def __init__(self, client, req: SummarizeRequest, concurrency: int, on_event=None) -> None:
        self.client = client
        self.req = req
        self.limit = client.info["max_model_len"]
        self.sem = asyncio.Semaphore(concurrency)
        self.on_event = on_event or (lambda ev: None)
        self.final = req.instructions or INSTRUCTIONS
        self.chunk = req.chunk_instructions or CHUNK_INSTRUCTIONS
        self.merge = req.merge_instructions or MERGE_INSTRUCTIONS
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.num_calls = 0

    async def count(self, texts: list[str]) -> list[int]:
        return (await self.client.rpc("count", texts=texts))["counts"] if texts else []

    async def overhead(self, instruction: str) -> int:
        """Tokens of the chat template and the instruction around an empty document."""
        return (await self.client.rpc("count", messages_list=[messages("", instruction)]))["counts"][0]

    def params(self, max_tokens: int) -> dict:
        r = self.req
        return {"max_tokens": max_tokens, "temperature": r.temperature, "top_p": r.top_p, "top_k": 0, "min_p": 0.0,
                "seed": r.seed, "stop": [], "stop_token_ids": [], "repetition_penalty": r.repetition_penalty,
                "presence_penalty": 0.0, "frequency_penalty": 0.0, "logprobs": None, "ignore_eos": False,
                "include_stop_str_in_output": False}

    async def generate(self, body: str, instruction: str, max_tokens: int, stream: bool = False) -> dict:
        """One engine request; retried while the engine answers 429 (queue full). ``stream``: the final
        pass, whose deltas (and prefill progress, if asked for) become events."""
        deadline = time.monotonic() + RETRY_429_S
        progress = stream and self.req.return_progress
        while True:
            try:
                sub = await self.client.submit([{"messages": messages(body, instruction)}], self.params(max_tokens),
                                               progress=progress)
                break
            except APIError as e:
                if e.status != 429 or time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
        parts, last = [], None
        try:
            async for _, it in sub.items():
                if "progress" in it:
                    self.on_event({"object": "summary.prompt_progress", "stage": "final",
                                   "prompt_progress": progress_body(it)})
                    continue
                parts.append(it["text"])
                if stream and it["text"]:
                    self.on_event({"object": "summary.delta", "delta": it["text"]})
                last = it
        finally:
            sub.close()
        self.num_calls += 1
        self.prompt_tokens += last["np"]
        self.completion_tokens += last["ng"]
        m = last["m"]
        ttft = None if m["first_token_s"] is None else m["first_token_s"] - m["arrival_s"]
        return {"text": "".join(parts).strip(), "finish_reason": last["reason"], "ttft_s": ttft,
                "prompt_tokens": last["np"]}

    async def run(self, document: str) -> dict:
        t0 = time.perf_counter()
        r = self.req
        (doc_tokens,) = await self.count([document])
        final_overhead = await self.overhead(self.final)
        fits = doc_tokens + final_overhead + MARGIN_TOKENS + r.max_tokens <= self.limit
        strategy = "single_pass" if (r.strategy == "single_pass" or (r.strategy == "auto" and fits)) else "map_reduce"
        if strategy == "single_pass" and not fits:
            raise bad_request(f"the document has {doc_tokens} tokens; with the instructions ({final_overhead} tokens) "
                              f"and max_tokens ({r.max_tokens}) it exceeds the model's context of {self.limit} "
                              "tokens; use strategy 'map_reduce' or 'auto'", param="strategy")
        if final_overhead + MARGIN_TOKENS + r.max_tokens >= self.limit:  # no map-reduce can make room
            raise bad_request(f"max_tokens ({r.max_tokens}) and the instructions ({final_overhead} tokens) leave no "
                              f"room for the document in the model's context of {self.limit} tokens",
                              param="max_tokens")
        self.on_event({"object": "summary.plan", "strategy": strategy, "document_tokens": doc_tokens,
                       "max_model_len": self.limit})
        levels: list[dict] = []
        body = document
        if strategy == "map_reduce":
            body = await self.map_reduce(document, levels, final_overhead)
        t_final = time.perf_counter()
        out = await self.generate(body, self.final, r.max_tokens, stream=True)
        t1 = time.perf_counter()
        return {"object": "summary", "model": None, "summary": out["text"], "strategy": strategy,
                "finish_reason": out["finish_reason"], "document_tokens": doc_tokens,
                "num_levels": len(levels), "levels": levels, "num_requests": self.num_calls,
                "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                          "total_tokens": self.prompt_tokens + self.completion_tokens,
                          "final_prompt_tokens": out["prompt_tokens"]},
                "timings": {"total_s": t1 - t0, "map_reduce_s": t_final - t0 if levels else 0.0,
                            "final_s": t1 - t_final, "final_ttft_s": out["ttft_s"]}}

    async def map_reduce(self, document: str, levels: list[dict], final_overhead: int) -> str:
        r = self.req
        pieces = split_paragraphs(document)
        for level in range(1, MAX_LEVELS + 1):
            instruction = self.chunk if level == 1 else self.merge
            room = self.limit - await self.overhead(instruction) - MARGIN_TOKENS
            # a chunk summary gets at most a quarter of the room, so a chunk holds several summaries
            # (even if re-tokenizing them inflates them) and every level shrinks the text
            chunk_max = min(r.chunk_max_tokens or r.max_tokens, room // 4)
            budget = room - chunk_max
            if r.chunk_tokens:
                budget = min(budget, r.chunk_tokens)
            if budget < 64 or chunk_max < 1:
                raise bad_request(f"the model's context ({self.limit} tokens) is too small to summarize in chunks "
                                  f"with these instructions and chunk_max_tokens={chunk_max}")
            chunks = await self.pack(pieces, budget)
            t0 = time.perf_counter()
            done = 0

            async def one(text: str) -> str:
                nonlocal done
                async with self.sem:
                    out = await self.generate(text, instruction, chunk_max)
                done += 1
                self.on_event({"object": "summary.progress", "stage": "map", "level": level,
                               "chunks_done": done, "chunks_total": len(chunks)})
                return out["text"]

            tasks = [asyncio.ensure_future(one(c)) for c in chunks]
            try:
                summaries = await asyncio.gather(*tasks)
            except BaseException:
                for t in tasks:
                    t.cancel()
                raise
            joined = "\n\n".join(s for s in summaries if s) or " "
            (joined_tokens,) = await self.count([joined])
            levels.append({"level": level, "num_chunks": len(chunks), "chunk_budget_tokens": budget,
                           "chunk_max_tokens": chunk_max, "output_tokens": joined_tokens,
                           "wall_s": time.perf_counter() - t0})
            if joined_tokens + final_overhead + MARGIN_TOKENS + r.max_tokens <= self.limit:
                return joined
            pieces = [s for s in summaries if s]
        raise APIError(500, f"the summaries did not fit the context after {MAX_LEVELS} levels of map-reduce",
                       code="summarize_failed")

    async def fit(self, pieces: list[str], budget: int) -> list[tuple[str, int]]:
        """(piece, tokens) in document order; a piece longer than the budget is cut into shorter ones."""
        out: list[tuple[str, int]] = []
        for p, n in zip(pieces, await self.count(pieces)):
            if n <= budget:
                out.append((p, n))
            else:
                out.extend(await self.fit(split_evenly(p, -(-n * 5 // (budget * 4)) + 1), budget))
        return out

    async def pack(self, pieces: list[str], budget: int) -> list[str]:
        """Consecutive pieces packed into as few chunks of at most ``budget`` tokens as greedy packing
        needs, with sizes evened out (similar prefill times; attention cost grows with the square).
        Token counts of pieces do not add up exactly (merges at the joins), so each chunk is counted
        again and one that is over the budget is split in two."""
        sized = await self.fit(pieces, budget)
        groups = pack_sized(sized, budget)
        total = sum(n + 1 for _, n in sized)
        limit = -(-total // len(groups))
        while limit < budget:
            even = pack_sized(sized, limit)
            if len(even) == len(groups):
                groups = even
                break
            limit += max(1, budget // 50)
        while True:
            texts = ["\n\n".join(p for p, _ in g) for g in groups]
            over = {i for i, n in enumerate(await self.count(texts)) if n > budget}
            if not over:
                return texts
            if all(len(groups[i]) == 1 for i in over):  # single pieces were counted alone by fit()
                return texts
            groups = [half for i, g in enumerate(groups)
                      for half in ((g[: len(g) // 2], g[len(g) // 2:]) if i in over and len(g) > 1 else (g,))]


def pack_sized(sized: list[tuple[str, int]], budget: int) -> list[list[tuple[str, int]]]:
    groups: list[list[tuple[str, int]]] = []
    cur: list[tuple[str, int]] = []
    cur_n = 0
    for p, n in sized:
        if cur and cur_n + n + 1 > budget:
            groups.append(cur)
            cur, cur_n = [], 0
        cur.append((p, n))
        cur_n += n + 1
    if cur:
        groups.append(cur)
    return groups
