"""The wire between the API process and the engine process: msgpack dicts over two ZMQ PUSH/PULL pipes.

The API process binds both ipc:// sockets in a private temporary directory, then starts the engine
process, which connects. Each side only pushes; per-pipe ordering is FIFO, so the engine's answer
to an ``add`` always arrives before that request's first tokens.

API -> engine
  add       {gid, prompts: [prompt spec], n, params: SamplingParams fields, arrival_s, progress}
            prompt spec: {text} | {ids} | {messages} | {fim: {prefix, suffix, middle, extra: [[filename, text]]}}
            progress: report each request's prefill progress in the out messages
  abort     {rids: [...]}
  rpc       {id, method: stats | tokenize | detokenize | count, args}
  shutdown  {}

engine -> API
  ready     {info: model, max_model_len, kv_capacity_tokens, sp, tp, has_fim, fim, ...}
  fatal     {message}                 the engine failed (at load or in a step) and is exiting
  added     {gid, rids, prompt_tokens} or rejected {gid, status, message, param, code}
  out       {items: [output item], steps: [step record], progress: [{rid, progress: {total, cached, processed,
            time_ms}}]}   progress of the requests that asked for it, sent before the step's items
  rpc       {id, result} or {id, error}
  heartbeat {stats}
"""

from __future__ import annotations

import os
import tempfile

import msgpack

# message types
ADD, ABORT, RPC, SHUTDOWN = "add", "abort", "rpc", "shutdown"
READY, FATAL, ADDED, REJECTED, OUT, HEARTBEAT = "ready", "fatal", "added", "rejected", "out", "heartbeat"

HEARTBEAT_INTERVAL_S = 1.0


def pack(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def unpack(data: bytes) -> dict:
    return msgpack.unpackb(data, raw=False, strict_map_key=False)


def make_addresses() -> tuple[str, str, str]:
    """A private directory and the two socket addresses in it: (dir, to_engine, from_engine)."""
    d = tempfile.mkdtemp(prefix="csps-ipc-")
    return d, f"ipc://{os.path.join(d, 'to_engine')}", f"ipc://{os.path.join(d, 'from_engine')}"
