"""A serving world of ranks: rank 0 is the calling process (the engine), ranks 1..W-1 are
child processes running ``target(rank, world_size, *args)``.

Unlike ``launch.spawn`` (every rank a child, results collected at the end), the engine keeps
running in the caller and talks to its ranks step by step through collectives.

Children start from the package's own entry point, ``python -m csps.parallel.rank_entry``, which
reads its task (a pickle) from stdin: nothing re-imports the caller's main module, so a user's
script or notebook needs no ``if __name__ == "__main__":`` guard. A child that fails writes a
report (rank, error, traceback) to a file before exiting, so rank 0 can say which rank failed and
why instead of only "connection closed"; a child whose parent died exits by itself. Under
``torchrun`` (RANK/WORLD_SIZE in the environment) nothing is spawned: every rank already exists and
joins the same rendezvous.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Callable

from csps.parallel.launch import free_port

log = logging.getLogger("csps.parallel.rank_group")

PARENT_POLL_S = 1.0  # how often a child checks that its parent is still alive


def _watch_parent(parent_pid: int) -> None:
    """Exit this child as soon as the process that started it is gone (killed, crashed)."""
    def watch() -> None:
        while True:
            time.sleep(PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="csps-parent-watch").start()


def _write_report(path: str, rank: int, e: BaseException) -> None:
    report = {"rank": rank, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc(),
              "time_s": time.time()}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(report, f)
    os.replace(tmp, path)  # the parent never reads half a report


def run_rank(stream) -> None:
    """The body of ``python -m csps.parallel.rank_entry``: two pickles on ``stream`` (the launch
    facts, then the target and its args); never returns."""
    head = pickle.load(stream)
    rank = head["rank"]
    _watch_parent(head["parent_pid"])
    try:
        import torch

        torch.set_num_threads(head["num_threads"])
        target, args = pickle.load(stream)  # inside the try: a failure to unpickle is reported too
        from csps.parallel.groups import init_distributed

        init_distributed(head["backend"], timeout_s=head["timeout_s"])
        target(rank, head["world_size"], *args)
    except BaseException as e:  # noqa: BLE001 - reported to rank 0, then the process exits
        _write_report(head["report_path"], rank, e)
        log.error("rank %d failed: %s", rank, e)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class RankGroup:
    """Ranks 1..W-1 as local child processes; rank 0 joins from the calling process."""

    def __init__(self, world_size: int, target: Callable, args: tuple = (), timeout_s: float = 300.0,
                 num_threads: int | None = None, backend: str = "gloo") -> None:
        """``target`` must be importable by name (a module-level function of an installed module);
        ``backend``: gloo (CPU ranks) or nccl (rank r on cuda:r)."""
        self.world_size = world_size
        self.backend = backend
        self.procs: list[subprocess.Popen] = []
        self.timeout_s = timeout_s
        if num_threads is None:
            num_threads = max(1, (os.cpu_count() or 1) // world_size)
        self.num_threads = num_threads
        self.port = free_port()
        self.report_dir = tempfile.mkdtemp(prefix="csps_ranks_")
        task = pickle.dumps((target, args), protocol=pickle.HIGHEST_PROTOCOL)
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port),
                   WORLD_SIZE=str(world_size), OMP_NUM_THREADS=str(num_threads),
                   # the caller's import path, so every module the task names resolves in the child
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p),
                   # never the working directory first: a folder there must not shadow an installed package
                   PYTHONSAFEPATH="1")
        try:
            for r in range(1, world_size):
                head = dict(rank=r, world_size=world_size, parent_pid=os.getpid(), num_threads=num_threads,
                            timeout_s=timeout_s, report_path=self._report_path(r), backend=backend)
                p = subprocess.Popen([sys.executable, "-m", "csps.parallel.rank_entry"], stdin=subprocess.PIPE,
                                     env=dict(env, RANK=str(r), LOCAL_RANK=str(r)))
                self.procs.append(p)
                p.stdin.write(pickle.dumps(head) + task)
                p.stdin.close()
        except BaseException:
            self.stop(grace_s=0.0)
            raise

    def _report_path(self, rank: int) -> str:
        return os.path.join(self.report_dir, f"rank{rank}.json")

    def join_as_rank0(self) -> None:
        """Rendezvous with the children; fails at once (with the child's error) if one dies first."""
        import torch
        from csps.parallel.groups import init_distributed

        torch.set_num_threads(self.num_threads)
        env = dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(self.port), RANK="0", LOCAL_RANK="0",
                   WORLD_SIZE=str(self.world_size))
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # env:// rendezvous reads these; restored below (we are not torchrun)
        try:
            self._rendezvous(init_distributed)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _rendezvous(self, init_distributed) -> None:
        outcome: list[BaseException | None] = []

        def join() -> None:
            try:
                init_distributed(self.backend, timeout_s=self.timeout_s)
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

    def _reports(self) -> list[dict]:
        out = []
        for r in range(1, self.world_size):
            try:
                with open(self._report_path(r)) as f:
                    out.append(json.load(f))
            except (OSError, ValueError):
                pass
        return out

    def first_error(self, wait_s: float = 2.0) -> str | None:
        """The earliest failure a child reported (waiting up to ``wait_s`` for one), or a dead child."""
        end = time.time() + wait_s
        reports = self._reports()
        while not reports and time.time() < end:
            if any(p.poll() is not None for p in self.procs):
                time.sleep(0.2)  # a dead child's report is written before it exits; a peer's may follow
                reports = self._reports()
                break
            time.sleep(0.05)
            reports = self._reports()
        if reports:
            first = min(reports, key=lambda r: r["time_s"])
            return f"rank {first['rank']} failed: {first['error']}\n{first['traceback']}"
        dead = [(r + 1, p.returncode) for r, p in enumerate(self.procs) if p.poll() is not None]
        if dead:
            return f"rank {dead[0][0]} died with exit code {dead[0][1]}"
        return None

    def alive(self) -> bool:
        return all(p.poll() is None for p in self.procs)

    def stop(self, grace_s: float = 5.0) -> None:
        """Wait up to ``grace_s`` for the children to exit, then terminate, then kill them."""
        end = time.time() + grace_s
        for p in self.procs:
            try:
                p.wait(timeout=max(0.0, end - time.time()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=2.0)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=2.0)
        self.procs = []
        shutil.rmtree(self.report_dir, ignore_errors=True)
