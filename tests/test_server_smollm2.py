"""Smoke test: ``csps serve`` with the embedded default model (SmolLM2-135M-Instruct) answers sensibly."""

import openai
import pytest
from csps.server.testing import ServerProcess

pytestmark = pytest.mark.slow


def test_smollm2_chat_and_completion():
    with ServerProcess(["--model", "smollm2", "--max-model-len", "2048", "--dtype", "float32"]) as srv:
        assert "csps serving smollm2" in srv.log and "KV cache" in srv.log
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        r = client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0)
        answer = r.choices[0].message.content
        assert "Paris" in answer, answer
        assert r.usage.completion_tokens <= 16 and r.usage.prompt_tokens > 10
        chunks = list(client.chat.completions.create(
            model="smollm2", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16, temperature=0, stream=True))
        assert "Paris" in "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        c = client.completions.create(model="smollm2", prompt="The capital of France is", max_tokens=4, temperature=0)
        assert "Paris" in c.choices[0].text
