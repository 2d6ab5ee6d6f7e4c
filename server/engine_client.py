"""The API process's handle on the engine process: start it, submit requests, stream deltas, watch it.

``EngineClient`` owns the child process and the two ZMQ pipes (see ``csps.server.ipc``). One reader
task routes the engine's messages to per-submission ``asyncio.Queue``s and RPC futures; a watchdog
notices the engine's death (process exit or a ``fatal`` message) and fails everything in flight
with a 503, so no request waits forever. Nothing here imports torch.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid

import zmq
import zmq.asyncio
from csps.server import ipc
from csps.server.config import ServerConfig
from csps.server.errors import APIError, engine_unavailable

log = logging.getLogger("csps.server")

STARTING, READY, DEAD, STOPPED = "starting", "ready", "dead", "stopped"


class Submission:
    """The engine requests of one API call (prompts × n choices) and the queue of their deltas."""

    def __init__(self, client: EngineClient, gid: str) -> None:
        self.client = client
        self.gid = gid
        self.queue: asyncio.Queue = asyncio.Queue()
        self.rids: list[str] = []
        self.index: dict[str, int] = {}  # rid -> choice index
        self.prompt_tokens: list[int] = []
        self.unfinished: set[str] = set()
        self.accepted: asyncio.Future = asyncio.get_running_loop().create_future()

    def put(self, item: dict) -> None:
        if item.get("done"):
            self.unfinished.discard(item["rid"])
        self.queue.put_nowait(item)

    async def items(self):
        """Yield (choice index, item) until every choice has finished; 503 if the engine dies. An item is a
        token delta (text, ids, done, ...) or, when asked for at submission, prefill progress (progress)."""
        while self.unfinished or not self.queue.empty():
            item = await self.queue.get()
            if "error" in item:
                raise item["error"]
            yield self.index[item["rid"]], item

    def close(self) -> None:
        """Abort whatever has not finished (client gone, error) and stop routing deltas here."""
        self.client.release(self)


class EngineClient:
    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.state = STARTING
        self.reason = ""  # why the engine is dead
        self.info: dict = {}
        self.last_stats: dict = {}
        self.last_seen_s = time.monotonic()
        self.started_s = time.monotonic()
        self.started_wall_s = time.time()
        self.ready_event = asyncio.Event()
        self.proc: subprocess.Popen | None = None
        self.subs: dict[str, Submission] = {}  # gid -> submission
        self.by_rid: dict[str, Submission] = {}
        self.rpcs: dict[int, asyncio.Future] = {}
        self._rpc_ids = itertools.count()
        self._tasks: list[asyncio.Task] = []
        self.on_output = None  # callback(items, steps) for metrics
        self.on_death = None  # callback(reason)
        self.on_abort = None  # callback(number of engine requests aborted)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        self.ipc_dir, to_engine, from_engine = ipc.make_addresses()
        # sends never block the event loop: a plain socket, unlimited queue, NOBLOCK (see _send)
        self.push_ctx = zmq.Context()
        self.push = self.push_ctx.socket(zmq.PUSH)
        self.push.setsockopt(zmq.LINGER, 0)
        self.push.setsockopt(zmq.SNDHWM, 0)
        self.push.bind(to_engine)
        self.ctx = zmq.asyncio.Context()
        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(from_engine)
        spec = {"engine_kwargs": self.cfg.engine_kwargs, "to_engine": to_engine, "from_engine": from_engine,
                "max_waiting": self.cfg.max_waiting, "parent_pid": os.getpid(), "log_level": self.cfg.log_level,
                "log_format": self.cfg.log_format, "fim_template": self.cfg.fim_template,
                "grammar_timeout_s": self.cfg.grammar_compile_timeout_s}
        # PYTHONSAFEPATH: the working directory must not shadow installed packages (a repository checkout's
        # kernels/ folder would shadow the 'kernels' package transformers imports)
        self.proc = subprocess.Popen([sys.executable, "-m", "csps.server.engine_proc", json.dumps(spec)],
                                     start_new_session=True, env=dict(os.environ, PYTHONSAFEPATH="1"))
        log.info("engine process %d starting (model %s)", self.proc.pid, self.cfg.engine_kwargs["model"])
        self._tasks = [asyncio.create_task(self._reader()), asyncio.create_task(self._watchdog())]

    async def shutdown(self, timeout_s: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self._send({"type": ipc.SHUTDOWN})
            deadline = time.monotonic() + timeout_s
            while self.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if self.proc.poll() is None:
                log.warning("engine process %d did not stop; killing it", self.proc.pid)
                self.proc.kill()
                self.proc.wait()
        if self.state != DEAD:
            self.state = STOPPED
        for t in self._tasks:
            t.cancel()
        self._fail_all(engine_unavailable("the server is shutting down", "shutting_down"))
        self.push.close(0)
        self.pull.close(0)
        self.push_ctx.term()
        self.ctx.term()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def _die(self, reason: str) -> None:
        if self.state in (DEAD, STOPPED):
            return
        self.state = DEAD
        self.reason = reason
        log.error("engine died: %s", reason)
        self.ready_event.set()
        self._fail_all(engine_unavailable(f"the engine died: {reason}", "engine_dead"))
        if self.on_death is not None:
            self.on_death(reason)

    def _fail_all(self, err: APIError) -> None:
        for sub in list(self.subs.values()):
            if not sub.accepted.done():
                sub.accepted.set_exception(err)
            sub.queue.put_nowait({"error": err})
        for fut in self.rpcs.values():
            if not fut.done():
                fut.set_exception(err)
        self.rpcs.clear()

    async def _watchdog(self) -> None:
        while True:
            await asyncio.sleep(0.2)
            code = self.proc.poll()
            if code is not None:
                await asyncio.sleep(0.2)  # let the reader take a last 'fatal' message first
                self._die(self.reason or f"the engine process exited with code {code}")
                return
            if self.state == STARTING and time.monotonic() - self.started_s > self.cfg.engine_start_timeout_s:
                self.proc.kill()
                self._die(f"the engine did not start within {self.cfg.engine_start_timeout_s:.0f} s")
                return

    async def _reader(self) -> None:
        while True:
            data = await self.pull.recv()
            self.last_seen_s = time.monotonic()
            try:
                self._dispatch(ipc.unpack(data))
            except Exception:  # noqa: BLE001 - a bad message must not stop the routing of all others
                log.exception("cannot handle a message from the engine")

    def _dispatch(self, msg: dict) -> None:
        kind = msg["type"]
        if kind == ipc.OUT:
            for p in msg.get("progress", ()):  # before the step's tokens: a prefill ends before its first token
                sub = self.by_rid.get(p["rid"])
                if sub is not None:
                    sub.put(p)
            for it in msg["items"]:
                sub = self.by_rid.get(it["rid"])
                if sub is not None:
                    sub.put(it)
                    if it["done"]:
                        self.by_rid.pop(it["rid"], None)
            if self.on_output is not None:
                self.on_output(msg["items"], msg["steps"])
        elif kind in (ipc.ADDED, ipc.REJECTED):
            self._on_added(msg)
        elif kind == ipc.RPC:
            fut = self.rpcs.pop(msg["id"], None)
            if fut is not None and not fut.done():
                if "error" in msg:
                    fut.set_exception(APIError(msg.get("status", 500), msg["error"]))
                else:
                    fut.set_result(msg["result"])
        elif kind == ipc.HEARTBEAT:
            self.last_stats = msg["stats"]
        elif kind == ipc.READY:
            self.info = msg["info"]
            self.state = READY
            self.ready_event.set()
        elif kind == ipc.FATAL:
            self.reason = msg["message"]
            self._die(msg["message"])

    def _on_added(self, msg: dict) -> None:
        sub = self.subs.get(msg["gid"])
        if sub is None:  # the caller gave up; drop whatever was admitted
            if msg["type"] == ipc.ADDED:
                self._send({"type": ipc.ABORT, "rids": msg["rids"]})
            return
        if msg["type"] == ipc.REJECTED:
            self.subs.pop(sub.gid, None)
            headers = {"Retry-After": str(self.cfg.retry_after_s)} if msg["status"] == 429 else None
            sub.accepted.set_exception(APIError(msg["status"], msg["message"], param=msg.get("param"),
                                                code=msg.get("code"), headers=headers))
            return
        sub.rids = list(msg["rids"])
        sub.prompt_tokens = list(msg["prompt_tokens"])
        for i, rid in enumerate(sub.rids):
            sub.index[rid] = i
            self.by_rid[rid] = sub
        sub.unfinished = set(sub.rids)
        sub.accepted.set_result(True)

    def _send(self, msg: dict) -> bool:
        """Queue a message for the engine; False if it cannot take it (not connected: gone)."""
        try:
            self.push.send(ipc.pack(msg), zmq.NOBLOCK)
            return True
        except zmq.ZMQError:
            return False

    # -- requests --------------------------------------------------------------------------
    def check_available(self) -> None:
        if self.state == STARTING:
            raise engine_unavailable("the engine is starting; retry shortly", "engine_starting")
        if self.state == DEAD:
            raise engine_unavailable(f"the engine died: {self.reason}", "engine_dead")
        if self.state == STOPPED:
            raise engine_unavailable("the server is shutting down", "shutting_down")

    async def submit(self, prompts: list[dict], params: dict, n: int = 1, progress: bool = False) -> Submission:
        """Queue prompts × n choices in the engine; 400/429/503 APIError if it refuses. ``progress``: the
        submission's items include prefill progress ({rid, progress: {total, cached, processed, time_ms}})."""
        self.check_available()
        sub = Submission(self, uuid.uuid4().hex[:16])
        self.subs[sub.gid] = sub
        sent = self._send({"type": ipc.ADD, "gid": sub.gid, "prompts": prompts, "n": n, "params": params,
                           "arrival_s": time.perf_counter(), "progress": progress})
        if not sent:
            self.subs.pop(sub.gid, None)
            raise engine_unavailable("the engine is not reachable", "engine_unreachable")
        try:
            await sub.accepted
        except BaseException:
            self.release(sub)
            raise
        return sub

    def release(self, sub: Submission) -> None:
        self.subs.pop(sub.gid, None)
        for rid in sub.rids:
            self.by_rid.pop(rid, None)
        if sub.unfinished and self.state == READY:
            self._send({"type": ipc.ABORT, "rids": sorted(sub.unfinished)})
            if self.on_abort is not None:
                self.on_abort(len(sub.unfinished))
        sub.unfinished = set()

    async def rpc(self, method: str, timeout_s: float | None = None, **args):
        self.check_available()
        rid = next(self._rpc_ids)
        fut = asyncio.get_running_loop().create_future()
        self.rpcs[rid] = fut
        if not self._send({"type": ipc.RPC, "id": rid, "method": method, "args": args}):
            self.rpcs.pop(rid, None)
            raise engine_unavailable("the engine is not reachable", "engine_unreachable")
        try:
            return await asyncio.wait_for(fut, timeout_s or self.cfg.rpc_timeout_s)
        except asyncio.TimeoutError:
            raise engine_unavailable(f"the engine did not answer '{method}' in time", "engine_busy") from None
        finally:
            self.rpcs.pop(rid, None)

    def health(self) -> tuple[int, dict]:
        silent_s = time.monotonic() - self.last_seen_s
        body = {"status": self.state, "model": self.cfg.model_name, "engine_pid": self.proc.pid if self.proc else None,
                "seconds_since_engine_message": round(silent_s, 3)}
        if self.state == DEAD:
            body["reason"] = self.reason
        if self.state == READY and silent_s > self.cfg.engine_stall_s:
            body["status"] = "stalled"
            return 503, body
        return (200 if self.state == READY else 503), body
