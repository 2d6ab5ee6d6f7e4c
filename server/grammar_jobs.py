"""Compiling grammars off the engine's loop (engine process): worker threads, a time limit per request.

The engine process hands each structured-output request's spec to ``GrammarJobs.submit`` and keeps
stepping the other requests; its loop calls ``poll``, which runs each job's callback once its grammar
is compiled (then the request is admitted: the engine finds the grammar in its cache), failed (400
naming the problem) or not ready within ``timeout_s`` (400 saying so). llguidance builds matchers
without holding the GIL, so the engine's steps go on meanwhile. A timed-out compile keeps its thread
until it ends (llguidance's size and fuel limits bound it, ``csps.engine.grammar``); its result is
cached.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from csps.core.structured_outputs import StructuredOutputs
from csps.errors import RequestError

log = logging.getLogger("csps.server.engine")

DEFAULT_TIMEOUT_S = 10.0
WORKERS = 2

Done = Callable[[Exception | None], None]  # called once: None (compiled) or the error to answer with


class GrammarJobs:
    def __init__(self, compile_fn: Callable[[StructuredOutputs], object], timeout_s: float = DEFAULT_TIMEOUT_S,
                 workers: int = WORKERS) -> None:
        self.compile_fn = compile_fn
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grammar")
        self.jobs: list[tuple[Future, float, StructuredOutputs, Done]] = []

    @property
    def pending(self) -> bool:
        return bool(self.jobs)

    def submit(self, so: StructuredOutputs, done: Done) -> None:
        self.jobs.append((self.pool.submit(self.compile_fn, so), time.monotonic() + self.timeout_s, so, done))

    def poll(self) -> None:
        """Answer every job that has finished or run out of time."""
        if not self.jobs:
            return
        now, waiting = time.monotonic(), []
        for job in self.jobs:
            fut, deadline, so, done = job
            if fut.done():
                done(fut.exception())
            elif now >= deadline:
                where = f"{so.param}: " if so.param else ""
                log.warning("a %s grammar (%d characters) did not compile within %.1f s", so.kind, len(so.spec),
                            self.timeout_s)
                done(RequestError(f"{where}the {so.kind} did not compile within {self.timeout_s:g} s (the server's "
                                  "limit, --grammar-compile-timeout); simplify it", so.param))
            else:
                waiting.append(job)
        self.jobs = waiting

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
