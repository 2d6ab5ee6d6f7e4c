"""Prefill progress (engine process): for the requests that asked for it, how much of the prompt has KV.

After each step the engine process reads each watched request's ``num_computed_tokens`` from the
scheduler's request (the engine is not changed for this) and reports what moved: ``total`` prompt
tokens, ``cached`` (served from the prefix cache at admission), ``processed`` (cached included, as
llama.cpp counts) and ``time_ms`` since the prefill started. The last report has processed == total;
a request preempted and recomputed reports from 0 again.
"""

from __future__ import annotations

import time


class PromptProgress:
    def __init__(self) -> None:
        self.watched: dict[str, tuple[object, int]] = {}  # rid -> (the scheduler's Request, last processed)

    def watch(self, rid: str, request) -> None:
        self.watched[rid] = (request, -1)

    def forget(self, rid: str) -> None:
        self.watched.pop(rid, None)

    def updates(self, now_s: float | None = None) -> list[dict]:
        """One report per watched request whose computed prompt tokens changed since the last one."""
        now_s = time.perf_counter() if now_s is None else now_s
        out = []
        for rid, (req, last) in list(self.watched.items()):
            start = req.metrics.first_scheduled_s
            total = req.num_prompt_tokens
            processed = min(req.num_computed_tokens, total)
            if start is None or processed == last:
                if req.status.finished:
                    del self.watched[rid]
                continue
            out.append({"rid": rid, "progress": {"total": total, "cached": req.num_cached_tokens,
                                                 "processed": processed,
                                                 "time_ms": round((now_s - start) * 1000.0, 3)}})
            if processed >= total or req.status.finished:
                del self.watched[rid]
            else:
                self.watched[rid] = (req, processed)
        return out


def progress_body(item: dict, index: int | None = None) -> dict:
    """The ``prompt_progress`` object of a progress item (API side). ``cache`` is llama.cpp's name for
    ``cached``; ``index`` names the choice when a request has several."""
    p = item["progress"]
    body = {"total": p["total"], "cached": p["cached"], "cache": p["cached"], "processed": p["processed"],
            "time_ms": p["time_ms"]}
    if index is not None:
        body["index"] = index
    return body
