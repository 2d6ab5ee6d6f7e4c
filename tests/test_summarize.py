"""/v1/summarize: the chunking logic with a fake engine, then the endpoint on a real server with a
small context window (single pass when the document fits, map-reduce when it does not)."""

import asyncio
import json

import httpx
import pytest
from csps.server.protocol import SummarizeRequest
from csps.server.summarize import (
    INSTRUCTIONS,
    Summarizer,
    split_evenly,
    split_paragraphs,
)
from csps.server.testing import ServerProcess

MAX_MODEL_LEN = 512


# -- the logic, against a fake engine (1 token per word) -------------------------------------------
class FakeSub:
    def __init__(self, text, np, ng):
        self.item = {"rid": "r", "text": text, "ids": [0] * ng, "done": True, "reason": "length", "np": np,
                     "ng": ng, "nc": 0, "m": {"arrival_s": 0.0, "first_token_s": 0.1, "first_scheduled_s": 0.0,
                                              "finished_s": 0.2, "tbt_s": []}}

    async def items(self):
        yield 0, self.item

    def close(self):
        pass


class FakeClient:
    """Counts words as tokens; a 'summary' is the first words of the text it was given."""

    def __init__(self, limit):
        self.info = {"max_model_len": limit}
        self.prompts = []

    @staticmethod
    def n(text):
        return len(text.split())

    async def rpc(self, method, **args):
        if "messages_list" in args:
            return {"counts": [self.n(m[0]["content"]) + 10 for m in args["messages_list"]]}
        return {"counts": [self.n(t) for t in args["texts"]]}

    async def submit(self, prompts, params, n=1, progress=False):
        content = prompts[0]["messages"][0]["content"]
        np = self.n(content) + 10
        assert np + params["max_tokens"] <= self.info["max_model_len"], "a prompt would not fit"
        self.prompts.append(content)
        words = content.split()[: params["max_tokens"]]
        return FakeSub(" ".join(words), np, len(words))


def run(client, text, **kw):
    req = SummarizeRequest(text=text, **kw)
    return asyncio.run(Summarizer(client, req, concurrency=4).run(text))


def test_split_helpers():
    assert split_paragraphs("a b\n\n\n  c\n \nd\n") == ["a b", "c", "d"]
    pieces = split_evenly("one two three four five six seven eight", 3)
    assert len(pieces) == 3 and " ".join(pieces) == "one two three four five six seven eight"
    assert split_evenly("x" * 10, 2) == ["xxxxx", "xxxxx"]  # no whitespace: cut anyway


def test_fits_goes_single_pass():
    client = FakeClient(1000)
    out = run(client, "word " * 300, max_tokens=100)
    assert out["strategy"] == "single_pass" and out["levels"] == [] and out["num_requests"] == 1
    assert client.prompts[0].startswith("word") and client.prompts[0].endswith(INSTRUCTIONS)


def test_too_long_goes_map_reduce_in_order_until_it_fits():
    client = FakeClient(500)
    doc = "\n\n".join(" ".join(f"p{i}w{j}" for j in range(60)) for i in range(40))  # 2400 words
    out = run(client, doc, max_tokens=60)
    assert out["strategy"] == "map_reduce" and len(out["levels"]) >= 2
    assert [lv["num_chunks"] for lv in out["levels"]] == sorted((lv["num_chunks"] for lv in out["levels"]),
                                                                reverse=True)
    first = [p for p in client.prompts[: out["levels"][0]["num_chunks"]]]
    # level-1 chunks cover the document in order, paragraphs kept whole, instructions after the text
    assert first[0].startswith("p0w0") and "p1w0" in first[0]
    assert all("consecutive part" in p.split("\n\n")[-1] for p in first)
    assert out["usage"]["total_tokens"] == out["usage"]["prompt_tokens"] + out["usage"]["completion_tokens"]


def test_a_paragraph_longer_than_a_chunk_is_cut():
    client = FakeClient(300)
    out = run(client, "word " * 3000, max_tokens=40)
    assert out["strategy"] == "map_reduce" and out["levels"][0]["num_chunks"] >= 10


def test_chunks_are_evened_out():
    client = FakeClient(600)
    # 30 paragraphs of 20 words: greedy packing would give one full chunk and a small remainder
    doc = "\n\n".join(" ".join(f"w{i}" for _ in range(20)) for i in range(30))
    out = run(client, doc, max_tokens=60)
    n = out["levels"][0]["num_chunks"]
    sizes = [len(p.split()) for p in client.prompts[:n]]
    assert n >= 2 and max(sizes) - min(sizes) <= 25, sizes


def test_chunks_over_budget_after_joining_are_split():
    class JoinsCost(FakeClient):  # like a real tokenizer, a joined text may need more tokens than its parts
        @staticmethod
        def n(text):
            return len(text.split()) + 6 * text.count("\n\n")

    client = JoinsCost(400)
    doc = "\n\n".join(" ".join(f"p{i}" for _ in range(10)) for i in range(120))
    out = run(client, doc, max_tokens=40)  # FakeClient.submit asserts every prompt fits
    assert out["strategy"] == "map_reduce"


def test_forced_single_pass_that_does_not_fit_is_a_400():
    from csps.server.errors import APIError

    with pytest.raises(APIError) as e:
        run(FakeClient(200), "word " * 500, max_tokens=50, strategy="single_pass")
    assert e.value.status == 400 and "500 tokens" in e.value.message and "200 tokens" in e.value.message


# -- the endpoint --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server():
    with ServerProcess(["--model", "dummy:tiny", "--max-model-len", str(MAX_MODEL_LEN)]) as srv:
        yield srv


def book_text(num_chars: int) -> str:
    with open("/work/shared/data/books/persuasion.txt", encoding="utf-8") as f:
        return f.read()[:num_chars]


SHORT_DOC = "Anne met Captain Wentworth again after eight years.\n\nThey were engaged at the end."
# random-weight model: sample (temperature 1) so chunk summaries are not empty
SAMPLING = {"temperature": 1.0, "seed": 3, "max_tokens": 16}


def test_endpoint_single_pass(server):
    r = httpx.post(server.url + "/v1/summarize", json={"text": SHORT_DOC, **SAMPLING}, timeout=120)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["object"] == "summary" and out["strategy"] == "single_pass" and out["num_requests"] == 1
    assert out["document_tokens"] < 40 and out["model"] == "dummy:tiny"
    assert out["usage"]["completion_tokens"] <= 16 and out["timings"]["total_s"] > 0


def test_endpoint_map_reduce_from_an_upload(server):
    doc = book_text(5000)  # ~1200 tokens, over twice the context
    files = {"file": ("persuasion.txt", doc.encode(), "text/plain")}
    data = {k: str(v) for k, v in SAMPLING.items()} | {"chunk_tokens": "128"}
    r = httpx.post(server.url + "/v1/summarize", files=files, data=data, timeout=600)
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["strategy"] == "map_reduce"
    assert out["document_tokens"] > 2 * MAX_MODEL_LEN
    assert out["levels"][0]["num_chunks"] >= 8 and out["num_levels"] >= 1
    assert out["usage"]["final_prompt_tokens"] + 16 <= MAX_MODEL_LEN
    assert out["num_requests"] == sum(lv["num_chunks"] for lv in out["levels"]) + 1


def test_endpoint_streams_plan_progress_deltas_and_result(server):
    body = {"text": book_text(3000), "stream": True, "chunk_tokens": 256, **SAMPLING}
    events = []
    with httpx.stream("POST", server.url + "/v1/summarize", json=body, timeout=600) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
    assert events[-1] == "[DONE]"
    objs = [json.loads(e) for e in events[:-1]]
    kinds = [o["object"] for o in objs]
    assert kinds[0] == "summary.plan" and objs[0]["strategy"] == "map_reduce"
    assert "summary.progress" in kinds and kinds[-1] == "summary"
    deltas = "".join(o["delta"] for o in objs if o["object"] == "summary.delta")
    assert deltas.strip() == objs[-1]["summary"]


@pytest.mark.parametrize("kwargs,status,fragment", [
    ({"json": {"text": "   "}}, 400, "the document is empty"),
    ({"json": {"text": "word " * 3000, "strategy": "single_pass"}}, 400, "exceeds the model's context"),
    ({"json": {"text": "hi", "style": "short"}}, 400, "unrecognized request argument: 'style'"),
    ({"files": {"file": ("a.txt", b"caf\xe9 au lait", "text/plain")}}, 400, "uploaded file is not valid UTF-8"),
    ({"files": {"other": ("a.txt", b"hello", "text/plain")}}, 400, "unexpected file field 'other'"),
    ({"data": {"max_tokens": "12"}, "files": {}}, 400, "upload it as the 'file' field"),
])
def test_endpoint_bad_input(server, kwargs, status, fragment):
    if kwargs.get("files") == {}:  # a multipart form without a file
        kwargs = {"files": {"max_tokens": (None, "12")}}
    r = httpx.post(server.url + "/v1/summarize", timeout=60, **kwargs)
    assert r.status_code == status, r.text
    assert fragment in r.json()["error"]["message"]
