"""The embedded default model (SmolLM2-135M-Instruct, GGUF) against transformers loading the same file."""

import os

import pytest
import torch

from csps import LLM, SamplingParams
from csps.engine.weights import default_model_path


@pytest.fixture(scope="module")
def hf_smollm2():
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    model = AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                 torch_dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def llm32():
    return LLM("smollm2", dtype="float32", kv_cache_bytes=64 << 20, token_budget=256)


def test_greedy_matches_transformers_on_gguf(hf_smollm2, llm32):
    tok = llm32.get_tokenizer()
    ids = tok.apply_chat_template([{"role": "user", "content": "Write a short poem about the sea."}])
    with torch.inference_mode():
        # an explicit attention mask: the prompt contains token 2 (<|im_end|>), which transformers
        # would otherwise mistake for padding and mask out
        x = torch.tensor([ids])
        ref = hf_smollm2.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=32,
                                  do_sample=False, min_new_tokens=32, eos_token_id=None, pad_token_id=2)
    want = ref[0, len(ids):].tolist()
    got = llm32.generate([ids], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))[0]
    assert got.token_ids == want
    assert got.text.strip(), "detokenized text should not be empty"


def test_logits_match_transformers_on_gguf(hf_smollm2, llm32):
    tok = llm32.get_tokenizer()
    ids = tok.encode("It is a truth universally acknowledged, that a single man in possession of a good fortune")
    with torch.inference_mode():
        ref = hf_smollm2(torch.tensor([ids])).logits[0, -1].float()
    engine = llm32.engine
    from csps.core.plan import SeqWork, StepPlan

    pool = engine.kvs[0].pool
    blocks = pool.allocate(-(-len(ids) // 16))
    try:
        seq = SeqWork(req_id="x", token_ids=ids, pos=[(0, len(ids))], new_block_ids=blocks, num_kv_before=0)
        ours = engine.model.logits(engine.rt.forward_hidden(StepPlan(step_id=-1, seqs=[seq])))[-1]
    finally:
        engine.rt.tables.apply(StepPlan(step_id=-1, free_req_ids=["x"]))
        pool.free(blocks)
    assert (ours - ref).abs().max().item() <= 1e-3
