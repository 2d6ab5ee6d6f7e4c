"""Start W local ranks (gloo over loopback) and collect what each returns.

``spawn(fn, world_size, args)`` runs ``fn(rank, world_size, *args)`` in ``world_size`` fresh
processes, after ``init_distributed("gloo")`` on a free port, and returns the per-rank return
values (picklable). Processes come from a multiprocessing "forkserver" that has imported torch once
(fresh processes, never forks of the caller, so it is safe under pytest, after torch ran threads,
and with CUDA); ``start_method="spawn"`` is the slow, fully fresh alternative.

Failure handling, in the parent:
  * a rank raises -> the others are killed and ONE ``SpawnError`` names the rank and carries its
    error message and traceback;
  * a rank dies without a report (segfault, os._exit) -> the same, with its exit code;
  * nothing finishes within ``timeout_s`` -> every child has dumped its Python stacks
    (``faulthandler.dump_traceback_later``) to a file; the parent kills them all and raises
    ``SpawnTimeout`` with those stacks in the message.
The gloo timeout is ``timeout_s`` + 5 s: a collective whose peer died raises in the child (gloo
sees the closed connection), while a true hang is reported by the parent, with stacks.
"""

from __future__ import annotations

import faulthandler
import multiprocessing as mp
import os
import pickle
import queue
import socket
import sys
import tempfile
import time
import traceback
from typing import Any, Callable

DUMP_GRACE_S = 1.5  # after the deadline, time for the children's stack dumps to land
ERROR_GRACE_S = 1.0  # after a first failure, time to hear about the others (pick the earliest)


class SpawnError(RuntimeError):
    """A rank failed; the message names it and includes its error."""


class SpawnTimeout(SpawnError):
    """The ranks did not finish in time; the message has their Python stacks."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _error_report(rank: int, e: BaseException) -> tuple:
    """(rank, "error", (message, traceback), time of failure)."""
    return (rank, "error", (f"{type(e).__name__}: {e}", traceback.format_exc()), time.time())


def _child(
    rank: int,
    world_size: int,
    port: int,
    fn: Callable,
    args: tuple,
    results: Any,
    deadline: float,
    dump_path: str,
    num_threads: int,
    environ: dict[str, str],
) -> None:
    # Forkserver children inherit the server's environment: use the caller's, as of this call.
    os.environ.clear()
    os.environ.update(environ)
    with open(dump_path, "w") as dump_file:
        faulthandler.dump_traceback_later(max(0.1, deadline - time.time()), file=dump_file)
        try:
            import torch
            import torch.distributed as dist
            from csps.parallel.groups import init_distributed

            torch.set_num_threads(num_threads)
            os.environ.update(
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
            )
            # A hung op outlives the deadline, so the parent reports it with stacks (SpawnTimeout).
            init_distributed("gloo", timeout_s=max(1.0, deadline - time.time()) + 5.0)
            try:
                report = (rank, "ok", pickle.dumps(fn(rank, world_size, *args)), time.time())
            except BaseException as e:  # noqa: BLE001 - reported to the parent
                report = _error_report(rank, e)
            # Report before tearing the group down: peers then fail with "connection closed",
            # later than this rank's own failure, and the parent reports the earliest failure.
            results.put(report)
            dist.destroy_process_group()
        except BaseException as e:  # noqa: BLE001 - setup or teardown failed
            results.put(_error_report(rank, e))
        finally:
            faulthandler.cancel_dump_traceback_later()


def _ensure_forkserver() -> None:
    """Start the forkserver now, with our sys.path (Python 3.11's forkserver ignores the parent's
    sys.path, so e.g. pytest's test directory would be missing and the preload would fail)."""
    from multiprocessing import forkserver

    saved = os.environ.get("PYTHONPATH")
    paths = [p for p in sys.path if p] + ([saved] if saved else [])
    os.environ["PYTHONPATH"] = os.pathsep.join(paths)
    try:
        forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved


def _stop(procs: list) -> None:
    for p in procs:
        if p.is_alive():
            p.terminate()
    for p in procs:
        p.join(timeout=2.0)
        if p.is_alive():
            p.kill()
            p.join(timeout=2.0)


def _read_dumps(paths: list[str], ranks: list[int]) -> str:
    parts = []
    for r in ranks:
        try:
            with open(paths[r]) as f:
                text = f.read().strip()
        except OSError:
            text = ""
        parts.append(f"--- rank {r} stacks ---\n{text or '(no dump)'}")
    return "\n".join(parts)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    timeout_s: float = 120.0,
    num_threads: int | None = None,
    start_method: str = "forkserver",
) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results by rank.

    ``fn`` must be picklable (a module-level function). ``num_threads``: torch threads per rank
    (default: the CPU count divided among the ranks, at least 1). ``start_method``:
    "forkserver" (default, fast; on first use it starts a server that imports torch once) or
    "spawn" (each rank imports torch itself, ~3 s of CPU per rank on the dev machines).
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // world_size)
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # The server imports torch once; every rank is then a fork of a process that has run no
        # torch op (no OpenMP pool yet), so it starts in ~0.1 s instead of a ~3 s torch import.
        # fn's module (and what it imports, e.g. pytest) is preloaded too, so it must not run
        # torch ops at import time. Only the first call in a process starts the server; later
        # calls reuse it and its preloads. Not thread-safe (sets PYTHONPATH while starting).
        preload = ["torch", "torch.distributed", "csps.parallel"]
        module = getattr(fn, "__module__", None)
        if module and module not in ("__main__", "__mp_main__"):
            preload.append(module)
        ctx.set_forkserver_preload(preload)
        _ensure_forkserver()
    results = ctx.Queue()
    env = dict(os.environ)
    port = free_port()
    deadline = time.time() + timeout_s
    with tempfile.TemporaryDirectory(prefix="csps_spawn_") as tmp:
        dump_paths = [os.path.join(tmp, f"rank{r}.txt") for r in range(world_size)]
        procs = [
            ctx.Process(
                target=_child,
                args=(r, world_size, port, fn, args, results, deadline, dump_paths[r], num_threads, env),
                daemon=True,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        values: dict[int, Any] = {}
        try:
            while len(values) < world_size:
                try:
                    report = results.get(timeout=0.05)
                except queue.Empty:
                    report = None
                if report is not None and report[1] == "error":
                    _raise_first_error(report, results, procs, world_size)
                if report is not None:
                    values[report[0]] = pickle.loads(report[2])
                    continue
                for r, p in enumerate(procs):
                    if r not in values and not p.is_alive() and p.exitcode not in (0, None):
                        _raise_first_error(None, results, procs, world_size)
                if time.time() > deadline:
                    time.sleep(DUMP_GRACE_S)  # let the children's faulthandler dumps land
                    pending = [r for r in range(world_size) if r not in values]
                    raise SpawnTimeout(
                        f"ranks {pending} of {world_size} did not finish within {timeout_s:.0f} s "
                        f"(hang?)\n{_read_dumps(dump_paths, pending)}"
                    )
        finally:
            _stop(procs)
    return [values[r] for r in range(world_size)]


def _raise_first_error(first: tuple | None, results: Any, procs: list, world_size: int) -> None:
    """Collect the failures reported within a short grace period; raise the earliest one.

    A rank that fails mid-collective makes its peers fail too ("connection closed by peer"):
    the earliest failure is the cause, the others are consequences.
    """
    errors = [first] if first is not None else []
    grace_end = time.time() + ERROR_GRACE_S
    while time.time() < grace_end:
        try:
            report = results.get(timeout=0.05)
        except queue.Empty:
            if all(not p.is_alive() for p in procs):
                break
            continue
        if report[1] == "error":
            errors.append(report)
    if not errors:
        dead = [(r, p.exitcode) for r, p in enumerate(procs) if p.exitcode not in (0, None)]
        r, code = dead[0]
        raise SpawnError(
            f"rank {r} of {world_size} died with exit code {code} without reporting a result "
            "(see its stderr)"
        )
    rank, _, (msg, tb), _ = min(errors, key=lambda rep: rep[3])
    others = sorted(rep[0] for rep in errors if rep[0] != rank)
    also = f" (ranks {others} failed after it)" if others else ""
    raise SpawnError(f"rank {rank} of {world_size} failed: {msg}{also}\n{tb}")
