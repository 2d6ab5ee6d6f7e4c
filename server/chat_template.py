"""Chat prompts with tools (engine process): the model's own chat template when it knows tools, else the
tools described in a system message in Hermes' format; and which tool-call format the model writes.

Templates that take ``tools`` (Qwen2.5, Llama 3.1, Hermes, ...) get them through transformers'
``apply_chat_template(tools=...)``, with assistant ``tool_calls`` (arguments as objects) and ``role:
"tool"`` messages as they are. A template that ignores tools (SmolLM2's) would silently drop them, so
for it the tools go into the system message with Hermes' instructions (``<tool_call>{...}</tool_call>``),
earlier calls become that text in the assistant's turn, and tool results are wrapped in
``<tool_response>`` tags in a ``tool`` turn.
"""

from __future__ import annotations

import json

HERMES, LLAMA3_JSON = "hermes", "llama3_json"

TOOLS_PROMPT = (
    "You can call functions to answer. The functions, as JSON signatures, are inside <tools></tools>:\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call functions, answer only with one JSON object per call, of the function's name and arguments, "
    "each inside <tool_call></tool_call> tags:\n"
    '<tool_call>\n{{"name": <function-name>, "arguments": <arguments-object>}}\n</tool_call>'
)


def template_source(tok) -> str:
    t = getattr(tok.hf, "chat_template", None)
    if isinstance(t, dict):  # several named templates: the default one, or the one for tools
        t = t.get("tool_use") or t.get("default") or ""
    return t or ""


def knows_tools(tok) -> bool:
    return "tools" in template_source(tok)


def tool_call_format(tok) -> str:
    """How this model writes tool calls when free to: 'hermes' (<tool_call>{...}</tool_call>, Qwen2.5,
    Hermes, and the fallback prompt here) or 'llama3_json' (a bare {"name", "parameters"} object, Llama 3.1)."""
    if tok is None:
        return HERMES
    src = template_source(tok)
    if "tools" in src and "<tool_call>" not in src and ("<|python_tag|>" in src or "ipython" in src):
        return LLAMA3_JSON
    return HERMES


def hermes_call_text(calls: list[dict]) -> str:
    return "\n".join("<tool_call>\n" + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]},
                                                  ensure_ascii=False) + "\n</tool_call>" for c in calls)


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The conversation for a template that does not know tools: plain roles and text only."""
    out = []
    for m in messages:
        m = dict(m)
        calls = m.pop("tool_calls", None)
        if calls:
            m["content"] = "\n".join(x for x in (m["content"], hermes_call_text(calls)) if x)
        if m["role"] == "tool":
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
            m.pop("tool_call_id", None)
            m.pop("name", None)
        out.append(m)
    if tools:
        described = TOOLS_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools))
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + described}
        else:
            out.insert(0, {"role": "system", "content": described})
    return out


def chat_prompt_ids(tok, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """Token ids of the conversation, ready for the assistant's answer."""
    plain = not tools and not any(m.get("tool_calls") or m["role"] == "tool" for m in messages)
    if plain:
        return tok.apply_chat_template(messages)
    if not knows_tools(tok):
        return tok.apply_chat_template(fallback_messages(messages, tools))
    out = tok.hf.apply_chat_template(messages, tools=tools or None, tokenize=True, add_generation_prompt=True)
    if isinstance(out, dict) or hasattr(out, "input_ids"):
        out = out["input_ids"]
    return list(out)
