"""The engine process: builds the engine (rank 0 of its SP × TP ranks) and serves the API process.

Started by the API process as ``python -m csps.server.engine_proc '<json spec>'``. Its loop drains
the incoming messages (add / abort / rpc / shutdown), steps the engine while it has work, and pushes
each step's token deltas back. It tokenizes prompts itself (one tokenizer, next to the model), so
the API process never loads torch or transformers. A failure is reported as a ``fatal`` message
before exiting; the process also exits when its parent (the API process) disappears.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
import traceback

import zmq
from csps.server import fim, ipc
from csps.server.chat_template import chat_prompt_ids, tool_call_format
from csps.server.grammar_jobs import DEFAULT_TIMEOUT_S, GrammarJobs
from csps.server.logs import setup_logging
from csps.server.prompt_progress import PromptProgress

from csps.core.sampling_params import SamplingParams
from csps.errors import CspsError, RequestError

log = logging.getLogger("csps.server.engine")


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table (byte-level BPE token text -> raw bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class TokenText:
    """Token id -> (display string, raw bytes) for logprobs, cached."""

    def __init__(self, tokenizer) -> None:
        self.tok = tokenizer
        self.decoder = _byte_decoder()
        self.cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        hit = self.cache.get(token_id)
        if hit is None:
            text = self.tok.token_str(token_id)
            piece = self.tok.hf.convert_ids_to_tokens(token_id) if 0 <= token_id < self.tok.vocab_size else ""
            if piece and all(ch in self.decoder for ch in piece):
                raw = [self.decoder[ch] for ch in piece]
            else:
                raw = list(text.encode("utf-8"))
            hit = self.cache[token_id] = (text, raw)
        return hit


def _metrics(m) -> dict:
    return {"arrival_s": m.arrival_s, "first_scheduled_s": m.first_scheduled_s,
            "first_token_s": m.token_times_s[0] if m.token_times_s else None,
            "finished_s": m.finished_s, "tbt_s": m.tbt_s}


class EngineServer:
    def __init__(self, engine, pull: zmq.Socket, push: zmq.Socket, max_waiting: int, parent_pid: int,
                 fim_template: str = fim.AUTO, grammar_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.engine = engine
        self.pull = pull
        self.push = push
        self.max_waiting = max_waiting
        self.parent_pid = parent_pid
        self.token_text = TokenText(engine.tokenizer) if engine.tokenizer is not None else None
        self.fim = self.choose_fim(fim_template)
        self.progress = PromptProgress()
        self.rid_logprobs: set[str] = set()
        self.last_step_id = -1
        self.last_heartbeat_s = 0.0
        # structured outputs: grammars compile on worker threads while the engine steps
        self.grammars = GrammarJobs(lambda so: engine.structured.compiler.compile(so), grammar_timeout_s)

    def choose_fim(self, choice: str) -> fim.FimFormat | None:
        tok = self.engine.tokenizer
        if tok is None:
            if choice not in (fim.AUTO, fim.NONE):
                raise CspsError(f"--fim-template {choice} needs a tokenizer, and this model has none")
            return None
        out = fim.choose(tok.hf.get_vocab(), tok.hf.bos_token_id, choice)
        if out is not None and out.missing:
            log.warning("FIM template %s: %s are not tokens of this model's vocabulary; they are tokenized as "
                        "text (the model was probably not trained with them)", out.name, " ".join(out.missing))
        elif out is not None:
            log.info("FIM template %s", out.name)
        return out

    def send(self, msg: dict) -> None:
        self.push.send(ipc.pack(msg))

    def info(self) -> dict:
        e = self.engine
        tok = e.tokenizer
        return {"model": e.config.model, "model_name": e.model_config.name or e.config.model,
                "max_model_len": e.max_model_len, "kv_capacity_tokens_per_rank": e.kv_capacity_tokens,
                "kv_capacity_tokens": getattr(e, "total_kv_capacity_tokens", e.kv_capacity_tokens),
                "sp": e.config.parallel.sp, "tp": e.config.parallel.tp,
                "has_fim": self.fim is not None, "fim": self.fim.name if self.fim else None,
                "vocab_size": e.model_config.vocab_size,
                "block_size": e.config.cache.block_size, "token_budget": e.config.scheduler.token_budget,
                "max_num_seqs": e.config.scheduler.max_num_seqs, "pid": os.getpid(),
                "tool_call_format": tool_call_format(tok)}

    # -- requests --------------------------------------------------------------------------
    def prompt_ids(self, spec: dict) -> list[int]:
        tok = self.engine.tokenizer
        if "ids" in spec:
            return [int(i) for i in spec["ids"]]
        if tok is None:
            raise RequestError("this engine has no tokenizer: send token ids")
        if "text" in spec:
            return tok.encode(spec["text"])
        if "messages" in spec:
            return chat_prompt_ids(tok, spec["messages"], spec.get("tools"))
        if "fim" in spec:
            if self.fim is None:
                raise RequestError("this model's tokenizer has no fill-in-the-middle tokens")
            f = spec["fim"]
            return self.fim.prompt(tok.encode, f["prefix"], f["suffix"], f.get("middle", ""),
                                   [tuple(x) for x in f.get("extra", ())])
        raise RequestError("no prompt given")

    def check_length(self, ids: list[int], max_tokens: int | None) -> int:
        """The max_tokens to use; RequestError with the numbers when the context is too small."""
        n, limit = len(ids), self.engine.max_model_len  # an empty prompt: Engine.validate_prompt says so
        if max_tokens is None:  # chat default: whatever room is left
            if n >= limit:
                raise RequestError(f"the prompt has {n} tokens but this model's maximum context length is "
                                 f"{limit} tokens: no room is left to generate", "messages")
            return limit - n
        if n + max_tokens > limit:
            raise RequestError(f"this model's maximum context length is {limit} tokens, but {n + max_tokens} "
                             f"were requested ({n} in the prompt, {max_tokens} for the completion); "
                             "shorten the prompt or lower max_tokens", "max_tokens")
        return max_tokens

    def on_add(self, msg: dict) -> None:
        gid, n = msg["gid"], msg["n"]
        with self.rejecting(gid):
            kw = dict(msg["params"])
            prompts = [self.prompt_ids(p) for p in msg["prompts"]]
            if any("fim" in p for p in msg["prompts"]):  # an infill ends at the template's end and marker tokens
                kw["stop_token_ids"] = sorted({*kw.get("stop_token_ids", ()), *self.fim.stop_token_ids})
            waiting = self.engine.stats()["num_waiting"]
            if waiting + len(prompts) * n > self.max_waiting:
                self.send({"type": ipc.REJECTED, "gid": gid, "status": 429, "code": "queue_full", "param": None,
                           "message": f"the server is busy: {waiting} requests are waiting "
                                      f"(limit {self.max_waiting}); retry later"})
                return
            plans = []
            for ids in prompts:
                max_tokens = self.check_length(ids, kw.get("max_tokens"))
                for j in range(n):
                    seed = kw.get("seed")
                    p = SamplingParams(**{**kw, "max_tokens": max_tokens,
                                          "seed": None if seed is None else seed + j})
                    self.engine.validate_prompt(ids, p)
                    plans.append((ids, p))
            so = plans[0][1].structured_outputs if plans else None
            if so is None:
                self.admit(msg, plans, prompts)
            else:  # compile the grammar first, off this loop (the engine finds it cached when admitting)
                self.grammars.submit(so, lambda err: self.admit(msg, plans, prompts, err))

    def admit(self, msg: dict, plans: list, prompts: list[list[int]], error: Exception | None = None) -> None:
        gid = msg["gid"]
        with self.rejecting(gid):
            if error is not None:
                raise error
            rids = []
            for k, (ids, p) in enumerate(plans):
                rid = f"{gid}-{k}"
                self.engine.add_request(ids, p, request_id=rid, arrival_s=msg.get("arrival_s"))
                rids.append(rid)
                if p.logprobs is not None:
                    self.rid_logprobs.add(rid)
                if msg.get("progress"):
                    self.progress.watch(rid, self.engine.scheduler.requests[rid])
            self.send({"type": ipc.ADDED, "gid": gid, "rids": rids, "prompt_tokens": [len(i) for i in prompts]})

    @contextlib.contextmanager
    def rejecting(self, gid: str):
        """Answer a failed admission: 400 for the request's own faults, 500 for anything else."""
        try:
            yield
        except CspsError as e:
            self.send({"type": ipc.REJECTED, "gid": gid, "status": 400, "message": str(e),
                       "param": getattr(e, "param", None), "code": "invalid_request"})
        except Exception as e:  # noqa: BLE001 - one bad request must not take the engine down
            log.exception("add %s failed", gid)
            self.send({"type": ipc.REJECTED, "gid": gid, "status": 500, "message": f"internal error: {e}",
                       "param": None, "code": "internal_error"})

    def on_rpc(self, msg: dict) -> None:
        method, args = msg["method"], msg.get("args") or {}
        try:
            result = self.call(method, args)
            self.send({"type": ipc.RPC, "id": msg["id"], "result": result})
        except CspsError as e:
            self.send({"type": ipc.RPC, "id": msg["id"], "error": str(e), "status": 400})
        except Exception as e:  # noqa: BLE001
            log.exception("rpc %s failed", method)
            self.send({"type": ipc.RPC, "id": msg["id"], "error": f"internal error: {e}", "status": 500})

    def call(self, method: str, args: dict):
        tok = self.engine.tokenizer
        if method == "stats":
            return self.engine.stats()
        if tok is None:
            raise RequestError("this engine has no tokenizer")
        if method == "tokenize":
            ids = tok.apply_chat_template(args["messages"]) if "messages" in args else tok.encode(args["text"])
            out = {"tokens": ids}
            if args.get("return_token_strs"):
                out["token_strs"] = [self.token_text(i)[0] for i in ids]
            return out
        if method == "detokenize":
            ids = [int(i) for i in args["tokens"]]
            bad = [i for i in ids if not 0 <= i < self.engine.model_config.vocab_size]
            if bad:
                raise RequestError(f"token id {bad[0]} is outside the vocabulary "
                                   f"(0..{self.engine.model_config.vocab_size - 1})")
            return {"text": tok.decode(ids)}
        if method == "count":
            if "messages_list" in args:
                return {"counts": [len(tok.apply_chat_template(m)) for m in args["messages_list"]]}
            texts = args["texts"]
            enc = tok.hf(texts, add_special_tokens=False)["input_ids"] if texts else []
            return {"counts": [len(x) for x in enc]}
        raise RequestError(f"unknown rpc method {method!r}")

    # -- outputs ---------------------------------------------------------------------------
    def item(self, o) -> dict:
        it = {"rid": o.request_id, "text": o.new_text, "ids": o.new_token_ids, "done": o.finished,
              "reason": o.finish_reason, "stop": o.stop_reason}
        if o.request_id in self.rid_logprobs and o.logprobs is not None:
            k = len(o.new_token_ids)
            lps = o.logprobs[len(o.logprobs) - k:] if k else []
            it["lp"] = [[*self.token_text(lp.token_id), lp.logprob,
                         [[*self.token_text(t), v] for t, v in lp.top]] for lp in lps]
        if o.finished:
            self.rid_logprobs.discard(o.request_id)
            it.update(np=o.num_prompt_tokens, ng=len(o.token_ids), nc=o.num_cached_tokens, m=_metrics(o.metrics))
        return it

    def new_steps(self) -> list[list]:
        log_ = self.engine.step_log
        if not log_ or log_[-1].step_id == self.last_step_id:
            return []
        out = []
        for rec in reversed(log_):
            if rec.step_id <= self.last_step_id:
                break
            out.append([rec.duration_s, rec.num_prefill_tokens, rec.num_decode_tokens, dict(rec.bytes_by_kind),
                        rec.num_preempted])
        self.last_step_id = log_[-1].step_id
        return out[::-1]

    def heartbeat(self, now: float) -> None:
        if now - self.last_heartbeat_s >= ipc.HEARTBEAT_INTERVAL_S:
            self.last_heartbeat_s = now
            self.send({"type": ipc.HEARTBEAT, "stats": self.engine.stats()})

    # -- the loop --------------------------------------------------------------------------
    def drain(self) -> bool:
        """Handle every queued message; False when asked to shut down."""
        while True:
            try:
                msg = ipc.unpack(self.pull.recv(zmq.NOBLOCK))
            except zmq.Again:
                return True
            kind = msg.get("type")
            if kind == ipc.ADD:
                self.on_add(msg)
            elif kind == ipc.ABORT:
                for rid in msg["rids"]:
                    self.engine.abort(rid)
                    self.rid_logprobs.discard(rid)
                    self.progress.forget(rid)
            elif kind == ipc.RPC:
                self.on_rpc(msg)
            elif kind == ipc.SHUTDOWN:
                return False

    def run(self) -> None:
        while True:
            busy = self.engine.has_unfinished()
            if self.pull.poll(0 if busy else (5 if self.grammars.pending else 50)) and not self.drain():
                log.info("engine shutting down")
                self.grammars.shutdown()
                return
            self.grammars.poll()
            if self.engine.has_unfinished():
                outputs = self.engine.step()
                steps = self.new_steps()
                progress = self.progress.updates() if self.progress.watched else []
                if outputs or steps or progress:
                    self.send({"type": ipc.OUT, "items": [self.item(o) for o in outputs], "steps": steps,
                               "progress": progress})
            self.heartbeat(time.monotonic())
            if os.getppid() != self.parent_pid:
                log.warning("the API process is gone; engine exiting")
                return


def main(argv: list[str] | None = None) -> int:
    spec = json.loads((argv or sys.argv[1:])[0])
    setup_logging(spec.get("log_format", "text"), spec.get("log_level", "info"))
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(spec["to_engine"])
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 2000)
    push.connect(spec["from_engine"])
    code = 0
    engine = None
    try:
        from csps.llm import create_engine, make_engine_config

        kw = dict(spec["engine_kwargs"])
        config = make_engine_config(**kw)
        engine = create_engine(config, max_model_len=kw.get("max_model_len"))
        server = EngineServer(engine, pull, push, spec["max_waiting"], spec["parent_pid"],
                              spec.get("fim_template", fim.AUTO), spec.get("grammar_timeout_s", DEFAULT_TIMEOUT_S))
        server.send({"type": ipc.READY, "info": server.info()})
        server.run()
    except CspsError as e:
        push.send(ipc.pack({"type": ipc.FATAL, "message": str(e)}))
        code = 2
    except BaseException as e:  # noqa: BLE001 - report every death, then exit non-zero
        log.error("engine failed:\n%s", traceback.format_exc())
        name = type(e).__name__
        push.send(ipc.pack({"type": ipc.FATAL, "message": f"{name}: {e}" if str(e) else name}))
        code = 1
    finally:
        if engine is not None:
            try:
                engine.shutdown()
            except Exception:  # noqa: BLE001
                log.exception("engine shutdown failed")
        pull.close(0)
        push.close()
        ctx.term()
    return code


if __name__ == "__main__":
    sys.exit(main())
