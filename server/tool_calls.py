"""Turning a chat completion's text into OpenAI tool calls, whole or streamed (API process).

Three ways the text holds calls, by ``tool_choice``:
- a named function: the text is that function's arguments object (the grammar made it so);
- ``required``: the text is a JSON array of ``{"name", "arguments"}`` calls (the grammar made it so);
- ``auto``: the model chose; its calls are parsed from its own format, Hermes'
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen2.5, and the fallback prompt of
  ``csps.server.chat_template``) or Llama 3.1's bare ``{"name": ..., "parameters": {...}}`` (several
  separated by ';'). Text that is not a call to one of the declared functions stays content.

``ToolCallStream`` turns text deltas into chat-completion chunk deltas: content as it comes (holding
back what may begin a ``<tool_call>`` tag), each call as one ``delta.tool_calls`` entry once complete,
except a named function, whose arguments stream as they are generated.
"""

from __future__ import annotations

import json
import uuid

HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"


def call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


def tool_call(index: int, name: str, arguments: str) -> dict:
    return {"index": index, "id": call_id(), "type": "function", "function": {"name": name, "arguments": arguments}}


def parse_call(text: str, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call's JSON text, if it is a call of one of ``names``."""
    try:
        return call_from(json.loads(text), names)
    except json.JSONDecodeError:
        return None


def call_from(obj, names: set[str]) -> tuple[str, str] | None:
    """(name, arguments JSON) of one call object ('arguments' or Llama's 'parameters'), if it is one."""
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_hermes(text: str, names: set[str]) -> tuple[str, list[tuple[str, str]]]:
    """(content without the calls, calls) of Hermes-format text. An unclosed last tag counts if its JSON is a call."""
    content, calls, pos = [], [], 0
    while True:
        start = text.find(HERMES_OPEN, pos)
        if start < 0:
            content.append(text[pos:])
            break
        end = text.find(HERMES_CLOSE, start)
        body = text[start + len(HERMES_OPEN): end if end >= 0 else len(text)]
        call = parse_call(body.strip(), names)
        content.append(text[pos:start] if call else text[pos: end + len(HERMES_CLOSE) if end >= 0 else len(text)])
        if call:
            calls.append(call)
        if end < 0:
            break
        pos = end + len(HERMES_CLOSE)
    return ("".join(content).strip(), calls) if calls else (text, [])


def parse_llama3_json(text: str, names: set[str]) -> tuple[str, list[tuple[str, str]]]:
    """Llama 3.1: the whole answer is one call object, or several separated by ';'; else it is content."""
    body = text.strip().removeprefix("<|python_tag|>").strip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return text, []
        call = call_from(obj, names)
        if call is None:
            return text, []
        calls.append(call)
        pos = len(body) - len(body[pos:].lstrip().removeprefix(";").lstrip())
    return ("", calls) if calls else (text, [])


def parse_required(text: str, names: set[str]) -> list[tuple[str, str]]:
    """The JSON array of calls that tool_choice 'required' constrains the output to."""
    try:
        items = json.loads(text)
    except json.JSONDecodeError:
        return []
    if not isinstance(items, list):
        return []
    calls = [call_from(x, names) for x in items]
    return [c for c in calls if c]


PARSERS = {"hermes": parse_hermes, "llama3_json": parse_llama3_json}


class ToolCalls:
    """How one chat request's output becomes content and tool calls."""

    def __init__(self, mode: str, names: list[str], fmt: str = "hermes") -> None:
        self.mode = mode  # 'auto', 'required' or the name of the forced function
        self.names = set(names)
        self.parse = PARSERS.get(fmt, parse_hermes)

    def message(self, text: str) -> tuple[str | None, list[dict]]:
        """(content, tool_calls) of a finished output."""
        if self.mode == "auto":
            content, calls = self.parse(text, self.names)
        elif self.mode == "required":
            content, calls = "", parse_required(text, self.names)
            if not calls:  # cut off (max_tokens) before a whole call: what came stays visible
                content = text
        else:
            content, calls = "", [(self.mode, text)]
        return (content or None), [tool_call(i, n, a) for i, (n, a) in enumerate(calls)]

    @staticmethod
    def finish_reason(engine_reason: str | None, num_calls: int) -> str | None:
        return "tool_calls" if num_calls and engine_reason == "stop" else engine_reason

    def stream(self) -> ToolCallStream:
        return ToolCallStream(self)


class ToolCallStream:
    """Text deltas in, chunk deltas out: ``{"content": ...}`` or ``{"tool_calls": [...]}``."""

    def __init__(self, spec: ToolCalls) -> None:
        self.spec = spec
        self.buf = ""  # text not yet turned into deltas
        self.num_calls = 0
        self.started = False  # named function: its header went out
        if spec.mode == "required":
            self.mode = "array"  # emit each call of the array as it closes
        elif spec.mode != "auto":
            self.mode = "named"  # stream the arguments
        else:
            self.mode = "hermes" if spec.parse is parse_hermes else "buffer"  # 'buffer': then maybe 'content'
        self.depth = self.item_start = 0
        self.in_string = self.escaped = False
        self.scanned = 0

    def _calls(self, calls: list[tuple[str, str]]) -> list[dict]:
        if not calls:
            return []
        out = [tool_call(self.num_calls + i, n, a) for i, (n, a) in enumerate(calls)]
        self.num_calls += len(calls)
        return [{"tool_calls": out}]

    def feed(self, text: str) -> list[dict]:
        if not text:
            return []
        if self.mode == "content":
            return [{"content": text}]
        if self.mode == "named":
            out = []
            if not self.started:
                self.started = True
                self.num_calls = 1
                out.append({"tool_calls": [tool_call(0, self.spec.mode, "")]})
            return out + [{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}]
        self.buf += text
        if self.mode == "array":
            return self._calls(self._array_items())
        if self.mode == "buffer":  # Llama 3.1 JSON: a call is known only once the answer is whole
            return [] if self.buf.lstrip()[:1] in ("", "{") else self._flush_content()
        return self._hermes(final=False)

    def finish(self) -> list[dict]:
        if self.mode in ("named", "array", "content"):
            return []
        if self.mode == "buffer":
            content, calls = self.spec.parse(self.buf, self.spec.names)
            self.buf = ""
            return ([{"content": content}] if content else []) + self._calls(calls)
        return self._hermes(final=True)

    def _flush_content(self) -> list[dict]:
        text, self.buf = self.buf, ""
        self.mode = "content"  # not a call: everything else streams as content
        return [{"content": text}] if text else []

    def _hermes(self, final: bool) -> list[dict]:
        out = []
        while self.buf:
            start = self.buf.find(HERMES_OPEN)
            if start < 0:
                # hold back a tail that may be the beginning of the tag
                keep = 0 if final else next((k for k in range(len(HERMES_OPEN) - 1, 0, -1)
                                             if self.buf.endswith(HERMES_OPEN[:k])), 0)
                text, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                if text:
                    out.append({"content": text})
                break
            if start > 0:
                out.append({"content": self.buf[:start]})
                self.buf = self.buf[start:]
            end = self.buf.find(HERMES_CLOSE)
            if end < 0 and not final:
                break  # inside a call: wait for its end
            body = self.buf[len(HERMES_OPEN): end if end >= 0 else len(self.buf)]
            whole = self.buf[: end + len(HERMES_CLOSE)] if end >= 0 else self.buf
            self.buf = self.buf[len(whole):]
            call = parse_call(body.strip(), self.spec.names)
            out += self._calls([call]) if call else [{"content": whole}]
        return out

    def _array_items(self) -> list[tuple[str, str]]:
        """Complete elements of the JSON array of calls scanned so far."""
        calls = []
        for i in range(self.scanned, len(self.buf)):
            ch = self.buf[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
                if self.depth == 2:
                    self.item_start = i
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 1:
                    call = parse_call(self.buf[self.item_start: i + 1], self.spec.names)
                    if call:
                        calls.append(call)
        self.scanned = len(self.buf)
        return calls
