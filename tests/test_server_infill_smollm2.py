"""Issue 12's acceptance on the embedded SmolLM2-135M-Instruct, over real HTTP: /infill with a 6,000-character
repository file answers with content and timings and its repeat is served from the prefix cache; a ~4k-token
streamed prompt gets a keepalive comment before its first data line (--sse-keepalive-interval 0.2); a
max_tokens 0 warm-up makes a longer prompt with the same prefix start from the cache.

SmolLM2's vocabulary has StarCoder2's repository tokens (<repo_name>, <file_sep>) but no FIM tokens, so
/infill needs --fim-template starcoder (the FIM markers are then tokenized as text)."""

from __future__ import annotations

import httpx
import pytest
from csps.server.testing import ServerProcess

pytestmark = pytest.mark.slow


def source_file(num_chars: int) -> str:
    """A Python module of ``num_chars`` characters."""
    out, i = [], 0
    while sum(map(len, out)) < num_chars:
        out.append(f"def scale_{i}(values, factor={i % 5 + 1}):\n"
                   f"    \"\"\"Multiply every value by {i % 5 + 1} and add {i}.\"\"\"\n"
                   f"    return [v * factor + {i} for v in values]\n\n\n")
        i += 1
    return "".join(out)[:num_chars]


@pytest.fixture(scope="module")
def http():
    args = ["--model", "smollm2", "--max-model-len", "8192", "--fim-template", "starcoder",
            "--sse-keepalive-interval", "0.2"]  # a 4k-token prefill takes well over a second on 2 cores
    with ServerProcess(args, timeout_s=900) as srv, httpx.Client(base_url=srv.url, timeout=900) as c:
        yield c


def test_infill_with_a_6000_character_file_then_its_repeat_from_the_cache(http):
    body = {"input_extra": [{"filename": "mathutil/scale.py", "text": source_file(6000)}],
            "input_prefix": "from mathutil.scale import scale_3\n\n\ndef double_all(values):\n    return ",
            "input_suffix": "\n", "n_predict": 16, "temperature": 0}
    first = http.post("/infill", json=body).json()
    assert isinstance(first["content"], str) and first["tokens_predicted"] >= 1, first
    assert first["timings"]["prompt_n"] == first["tokens_evaluated"] > 1000 and first["timings"]["prompt_ms"] > 0
    repeat = http.post("/infill", json={**body, "input_prefix": body["input_prefix"] + "["}).json()
    assert repeat["tokens_cached"] > 1000, repeat
    assert repeat["timings"]["prompt_ms"] < first["timings"]["prompt_ms"]


def test_a_streamed_4k_token_prompt_gets_a_keepalive_before_its_first_data_line(http):
    prompt = source_file(11500)
    assert 3500 < http.post("/tokenize", json={"prompt": prompt}).json()["count"] < 5000
    with http.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 2, "stream": True}) as r:
        lines = [line for line in r.iter_lines() if line]
    first_data = next(i for i, x in enumerate(lines) if x.startswith("data: "))
    assert first_data >= 1 and set(lines[:first_data]) == {": keepalive"}, lines[:first_data + 1]


def test_a_max_tokens_0_warm_up_then_a_longer_prompt_reports_cached_tokens(http):
    context = "# Repository: payroll\n" + source_file(7000).replace("scale_", "pay_")
    warm = http.post("/v1/completions", json={"prompt": context, "max_tokens": 0}).json()
    assert warm["usage"]["completion_tokens"] == 0 and warm["choices"][0]["text"] == ""
    longer = http.post("/v1/completions", json={"prompt": context + "\ndef total(values):\n", "max_tokens": 4,
                                                "temperature": 0}).json()
    assert longer["usage"]["prompt_tokens_details"]["cached_tokens"] > 1000, longer["usage"]
