"""Structured outputs with a real model (SmolLM2-135M-Instruct, fp32, greedy): the grammar keeps the model's
own answer, in the requested shape."""

import json

import jsonschema
import openai
import pytest
from structured_cases import TIME_TOOL, WEATHER_TOOL

from csps.server.testing import ServerProcess

pytestmark = pytest.mark.slow

CAPITAL = [{"role": "user", "content": 'What is the capital of France? Answer in JSON with the key "capital".'}]
WEATHER = [{"role": "user", "content": "What's the weather like in Paris today, in celsius?"}]


def test_smollm2_answers_in_json_and_calls_tools():
    with ServerProcess(["--model", "smollm2", "--max-model-len", "2048", "--dtype", "float32"]) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=30, temperature=0,
                                           response_format={"type": "json_object"})
        answer = json.loads(r.choices[0].message.content)
        assert isinstance(answer, dict) and "Paris" in answer.values(), answer
        r = client.chat.completions.create(model="smollm2", messages=CAPITAL, max_tokens=10, temperature=0,
                                           extra_body={"structured_outputs": {"choice": ["London", "Paris", "Rome"]}})
        assert r.choices[0].message.content == "Paris"
        r = client.chat.completions.create(model="smollm2", messages=WEATHER, max_tokens=60, temperature=0,
                                           tools=[WEATHER_TOOL, TIME_TOOL], tool_choice="required")
        (call,) = r.choices[0].message.tool_calls
        args = json.loads(call.function.arguments)
        jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])
        assert call.function.name == "get_weather" and args["city"] == "Paris" and args["unit"] == "celsius"
        assert r.choices[0].finish_reason == "tool_calls"
