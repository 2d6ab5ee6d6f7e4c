"""A serving world of ranks: rank 0 is the calling process (the engine), ranks 1..W-1 are
child processes running ``target(rank, world_size, *args)``.

Unlike ``launch.spawn`` (every rank a child, results collected at the end), the engine keeps
running in the caller and talks to its ranks step by step through collectives. Children report a
failure on an error queue before exiting, so rank 0 can say which rank failed and why instead of
only "connection closed". Under ``torchrun`` (RANK/WORLD_SIZE in the environment) nothing is
spawned: every rank already exists and joins the same rendezvous.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from typing import Any, Callable

from csps.parallel.launch import _ensure_forkserver, free_port

log = logging.getLogger("csps.parallel.rank_group")


def _child_main(rank: int, world_size: int, port: int, target: Callable, args: tuple, errors: Any,
                num_threads: int, timeout_s: float) -> None:
    try:
        import torch

        torch.set_num_threads(num_threads)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
        from csps.parallel.groups import init_distributed

        init_distributed("gloo", timeout_s=timeout_s)
        target(rank, world_size, *args)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then the process exits
        errors.put((rank, f"{type(e).__name__}: {e}", traceback.format_exc(), time.time()))
        errors.close()
        errors.join_thread()  # the report must reach the pipe before the process vanishes
        log.error("rank %d failed: %s", rank, e)
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


class RankGroup:
    """Ranks 1..W-1 as local child processes; rank 0 joins from the calling process."""

    def __init__(self, world_size: int, target: Callable, args: tuple = (), timeout_s: float = 300.0,
                 num_threads: int | None = None, start_method: str = "forkserver") -> None:
        self.world_size = world_size
        self.procs: list = []
        self.timeout_s = timeout_s
        if num_threads is None:
            num_threads = max(1, (os.cpu_count() or 1) // world_size)
        self.num_threads = num_threads
        ctx = mp.get_context(start_method)
        if start_method == "forkserver":
            ctx.set_forkserver_preload(["torch", "torch.distributed", "csps.parallel"])
            _ensure_forkserver()
        self.errors = ctx.Queue()
        self.port = free_port()
        for r in range(1, world_size):
            p = ctx.Process(target=_child_main, daemon=True,
                            args=(r, world_size, self.port, target, args, self.errors, num_threads, timeout_s))
            p.start()
            self.procs.append(p)

    def join_as_rank0(self) -> None:
        """Rendezvous with the children; fails at once (with the child's error) if one dies first."""
        import threading

        import torch

        from csps.parallel.groups import init_distributed

        torch.set_num_threads(self.num_threads)
        env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port), RANK="0", LOCAL_RANK="0",
                   WORLD_SIZE=str(self.world_size))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # env:// rendezvous reads these; restored below (we are not torchrun)
        try:
            self._rendezvous(init_distributed, threading)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _rendezvous(self, init_distributed, threading) -> None:
        outcome: list[BaseException | None] = []

        def join() -> None:
            try:
                init_distributed("gloo", timeout_s=self.timeout_s)
                outcome.append(None)
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                outcome.append(e)

        thread = threading.Thread(target=join, daemon=True, name="csps-rendezvous")
        thread.start()
        while thread.is_alive():
            thread.join(timeout=0.05)
            if thread.is_alive() and not self.alive():
                raise RuntimeError(self.first_error(wait_s=1.0) or "a rank died during start-up")
        if outcome and outcome[0] is not None:
            raise outcome[0]

    def first_error(self, wait_s: float = 2.0) -> str | None:
        """The earliest failure a child reported (waiting up to ``wait_s`` for one), or a dead child."""
        reports = []
        end = time.time() + wait_s
        while time.time() < end:
            try:
                reports.append(self.errors.get(timeout=0.05))
            except queue.Empty:
                if reports or any(not p.is_alive() for p in self.procs):
                    if not reports:
                        try:
                            reports.append(self.errors.get(timeout=0.5))
                        except queue.Empty:
                            pass
                    break
        if reports:
            rank, msg, tb, _ = min(reports, key=lambda r: r[3])
            return f"rank {rank} failed: {msg}\n{tb}"
        dead = [(r + 1, p.exitcode) for r, p in enumerate(self.procs) if not p.is_alive()]
        if dead:
            return f"rank {dead[0][0]} died with exit code {dead[0][1]}"
        return None

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def stop(self, grace_s: float = 5.0) -> None:
        end = time.time() + grace_s
        for p in self.procs:
            p.join(timeout=max(0.0, end - time.time()))
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
        self.procs = []
