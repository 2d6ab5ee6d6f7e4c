"""Tool calls on strings: the Hermes and Llama 3.1 parsers, the forced formats, the streaming parser
(whatever the split of the text into deltas), and chat prompts with tools."""

import json

import pytest
from structured_cases import TIME_TOOL, WEATHER_TOOL

from csps.server.chat_template import LLAMA3_JSON, chat_prompt_ids, fallback_messages, tool_call_format
from csps.server.structured_api import Tool, tools_spec
from csps.server.tool_calls import ToolCalls, parse_hermes, parse_llama3_json

NAMES = {"get_weather", "get_time"}
WEATHER = '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
TIME = '{"name": "get_time", "arguments": {"tz": "UTC"}}'


def test_hermes_calls_and_the_text_around_them():
    text = f"Let me check.\n<tool_call>\n{WEATHER}\n</tool_call>\n<tool_call>{TIME}</tool_call>"
    content, calls = parse_hermes(text, NAMES)
    assert content == "Let me check."
    assert calls == [("get_weather", '{"city": "Paris", "unit": "celsius"}'), ("get_time", '{"tz": "UTC"}')]
    # an unknown function or broken JSON stays text; an unclosed last tag still counts when its JSON is whole
    content, calls = parse_hermes('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call> ok', NAMES)
    assert calls == [] and "rm_rf" in content
    assert parse_hermes("<tool_call>{broken</tool_call>", NAMES)[1] == []
    assert parse_hermes(f"<tool_call>\n{TIME}", NAMES)[1] == [("get_time", '{"tz": "UTC"}')]
    assert parse_hermes("no calls here", NAMES) == ("no calls here", [])


def test_llama3_json_calls():
    one = '{"name": "get_time", "parameters": {"tz": "CET"}}'
    assert parse_llama3_json(one, NAMES) == ("", [("get_time", '{"tz": "CET"}')])
    assert parse_llama3_json("<|python_tag|>" + one + "; " + TIME, NAMES)[1] == [
        ("get_time", '{"tz": "CET"}'), ("get_time", '{"tz": "UTC"}')]
    # arguments given as a JSON string are accepted
    assert parse_llama3_json('{"name": "get_time", "parameters": "{\\"tz\\": \\"PST\\"}"}', NAMES)[1] == [
        ("get_time", '{"tz": "PST"}')]
    for text in ("The weather is fine.", '{"name": "nope", "parameters": {}}', '{"a": 1}', one + " trailing"):
        assert parse_llama3_json(text, NAMES) == (text, [])


def test_forced_formats_give_openai_tool_calls():
    content, calls = ToolCalls("required", list(NAMES)).message(f"[{WEATHER}, {TIME}]")
    assert content is None and [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in calls)
    assert len({c["id"] for c in calls}) == 2
    content, calls = ToolCalls("get_time", list(NAMES)).message('{"tz": "UTC"}')
    assert content is None and calls[0]["function"] == {"name": "get_time", "arguments": '{"tz": "UTC"}'}
    cut = '[{"name": "get_weather", "argu'  # max_tokens cut the array: nothing to call, the text stays visible
    assert ToolCalls("required", list(NAMES)).message(cut) == (cut, [])
    assert ToolCalls.finish_reason("stop", 2) == "tool_calls"
    assert ToolCalls.finish_reason("length", 1) == "length" and ToolCalls.finish_reason("stop", 0) == "stop"


def replay(tools: ToolCalls, text: str, size: int) -> tuple[str, list[dict]]:
    """Feed ``text`` in pieces of ``size`` characters; gather content and whole calls from the deltas."""
    stream, deltas = tools.stream(), []
    for i in range(0, len(text), size):
        deltas += stream.feed(text[i: i + size])
    deltas += stream.finish()
    content = "".join(d.get("content", "") for d in deltas)
    calls: dict[int, dict] = {}
    for d in deltas:
        for tc in d.get("tool_calls", []):
            call = calls.setdefault(tc["index"], {"name": None, "arguments": "", "id": None})
            call["id"] = tc.get("id") or call["id"]
            call["name"] = tc.get("function", {}).get("name") or call["name"]
            call["arguments"] += tc.get("function", {}).get("arguments") or ""
    assert stream.num_calls == len(calls)
    return content, [calls[i] for i in sorted(calls)]


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_streaming_matches_the_whole_text_however_split(size):
    hermes = ToolCalls("auto", list(NAMES), "hermes")
    text = f"Sure <tool_ca thing.\n<tool_call>\n{WEATHER}\n</tool_call>\nand <tool_call>{TIME}</tool_call> done"
    content, calls = replay(hermes, text, size)
    whole_content, whole_calls = hermes.message(text)
    assert [(c["name"], c["arguments"]) for c in calls] == [(c["function"]["name"], c["function"]["arguments"])
                                                            for c in whole_calls]
    assert content.split() == whole_content.split() and "<tool_ca thing." in content
    assert all(c["id"] for c in calls)
    required = ToolCalls("required", list(NAMES))
    _, calls = replay(required, f'[{WEATHER}, {{"name": "get_time", "arguments": {{"tz": "a}}]\\""}}}}]', size)
    assert [c["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[1]["arguments"]) == {"tz": 'a}]"'}  # brackets and quotes inside strings
    named = ToolCalls("get_time", list(NAMES))
    _, calls = replay(named, '{"tz": "UTC"}', size)
    assert calls == [{"name": "get_time", "arguments": '{"tz": "UTC"}', "id": calls[0]["id"]}]
    llama = ToolCalls("auto", list(NAMES), LLAMA3_JSON)
    assert replay(llama, '{"name": "get_time", "parameters": {"tz": "UTC"}}', size)[1][0]["name"] == "get_time"
    assert replay(llama, "Plain answer, {not a call}.", size) == ("Plain answer, {not a call}.", [])


def test_the_required_grammar_lists_the_tools():
    spec = tools_spec([Tool(**WEATHER_TOOL), Tool(**TIME_TOOL)], "required", False)
    schema = json.loads(spec["spec"])
    assert schema["minItems"] == 1 and schema["maxItems"] == 1  # parallel_tool_calls false: one call
    names = [alt["properties"]["name"]["const"] for alt in schema["items"]["anyOf"]]
    assert names == ["get_weather", "get_time"] and spec["param"] == "tools"
    named = tools_spec([Tool(**WEATHER_TOOL)], "get_weather", None)
    assert json.loads(named["spec"]) == WEATHER_TOOL["function"]["parameters"]


def test_template_without_tools_gets_them_in_the_system_message(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tool_call_format(tok) == "hermes"
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    convo = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]
    text = tok.decode(chat_prompt_ids(tok, convo, [WEATHER_TOOL, TIME_TOOL]))
    assert '"name": "get_weather"' in text and "<tool_call>" in text  # the tools and how to call them
    assert '{"name": "get_time", "arguments": {"tz": "UTC"}}' in text  # the earlier call
    assert "<tool_response>\n12:00\n</tool_response>" in text  # its result
    msgs = fallback_messages([{"role": "system", "content": "Be brief."}] + convo, [TIME_TOOL])
    assert msgs[0]["content"].startswith("Be brief.") and "get_time" in msgs[0]["content"]
    assert all("tool_calls" not in m for m in msgs)
    plain = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(tok, plain) == tok.apply_chat_template(plain)  # no tools: unchanged


def test_template_that_knows_tools_gets_them_itself(smollm2_tokenizer):
    import copy

    from csps.engine.tokenizer import Tokenizer

    hf = copy.deepcopy(smollm2_tokenizer.hf)
    hf.chat_template = ("{% if tools %}TOOLS:{% for t in tools %}{{ t.function.name }};{% endfor %}\n{% endif %}"
                        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
                        "{% for c in m.tool_calls or [] %}CALL {{ c.function.name }}({{ c.function.arguments | tojson }})"
                        "{% endfor %}\n{% endfor %}assistant:")
    tok = Tokenizer(hf)
    call = {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": {"tz": "UTC"}}}
    convo = [{"role": "user", "content": "time?"}, {"role": "assistant", "content": "", "tool_calls": [call]},
             {"role": "tool", "content": "12:00", "tool_call_id": "c1"}]
    text = tok.decode(chat_prompt_ids(tok, convo, [WEATHER_TOOL, TIME_TOOL]))
    assert text.startswith("TOOLS:get_weather;get_time;") and 'CALL get_time({"tz": "UTC"})' in text
    assert "tool:12:00" in text and "<tool_response>" not in text
