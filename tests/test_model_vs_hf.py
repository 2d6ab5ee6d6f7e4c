"""Logits and greedy tokens of csps against Hugging Face transformers (same config and weights)."""

import pytest
import torch
from hf_oracle import build_hf, hf_greedy, hf_logits

from csps.core.plan import SeqWork, StepPlan
from csps.core.sampling_params import SamplingParams
from csps.engine.engine import Engine
from csps.engine.rank_runtime import RankRuntime
from csps.llm import make_engine_config

TOL = 1e-3
BLOCK = 16


def chunked_logits(weights, ids: list[int], chunk: int) -> torch.Tensor:
    """Run a prompt through one rank's paged cache in chunks of ``chunk`` tokens; logits of every token."""
    n = len(ids)
    num_blocks = -(-n // BLOCK) + 2
    config = make_engine_config(model="test", dtype="float32", block_size=BLOCK, max_model_len=4096)
    rt = RankRuntime(config, weights, num_blocks)
    blocks = list(range(1, num_blocks))
    out = []
    for start in range(0, n, chunk):
        end = min(n, start + chunk)
        seq = SeqWork(req_id="r", token_ids=ids[start:end], pos=[(start, end)],
                      new_block_ids=blocks if start == 0 else [], num_kv_before=start)
        out.append(rt.model.logits(rt.forward_hidden(StepPlan(step_id=start, seqs=[seq]))))
    return torch.cat(out)


@pytest.fixture(scope="module", params=["llama", "qwen2", "mistral", "llama-yarn", "llama-linear"])
def arch_model(request):
    hf, cfg, sd = build_hf(request.param)
    return request.param, hf, cfg, sd


@pytest.mark.parametrize("chunk", [None, 1, 7, 64, 512])
def test_logits_match_transformers(arch_model, chunk):
    arch, hf, cfg, sd = arch_model
    n = 600 if chunk in (None, 512) else (40 if chunk == 1 else 200)
    ids = torch.randint(3, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logits(hf, ids)
    ours = chunked_logits((cfg, sd), ids, chunk or n)
    assert ref.abs().max() > 0.5, "logits should be of order 1 for a meaningful tolerance"
    diff = (ours - ref).abs().max().item()
    assert diff <= TOL, f"{arch} chunk={chunk}: max |diff| = {diff:.2e}"


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_greedy_generation_matches_transformers(arch):
    hf, cfg, sd = build_hf(arch)
    ids = torch.randint(3, cfg.vocab_size, (70,), generator=torch.Generator().manual_seed(2)).tolist()
    want = hf_greedy(hf, ids, 32)
    config = make_engine_config(model=f"hf-{arch}", dtype="float32", token_budget=32,
                                max_model_len=1024, num_blocks=64)
    engine = Engine(config, weights=(cfg, sd), load_tokenizer_=False)
    engine.add_request(ids, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True))
    got = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got = o.token_ids
    assert got == want


def test_hugging_face_directory_loads_and_matches(tmp_path):
    """A model saved with save_pretrained (config.json + safetensors) loads by path."""
    from csps import LLM

    hf, cfg, sd = build_hf("qwen2")
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ids = torch.randint(3, cfg.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    want = hf_greedy(hf, ids, 16)
    llm = LLM(str(tmp_path), dtype="float32", token_budget=32, num_blocks=64)
    assert llm.engine.model_config.arch == "qwen2" and llm.engine.model_config.attention_bias
    got = llm.generate([ids], SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    assert got[0].token_ids == want


def test_missing_or_bad_model_paths_give_clear_errors(tmp_path):
    from csps import LLM
    from csps.errors import CspsError

    with pytest.raises(CspsError, match="config.json"):
        LLM(str(tmp_path))
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(CspsError, match="GGUF"):
        LLM(str(bad))


# bf16 runs on every machine kind (emulated, slowly, where the CPU has no native bf16; the model is tiny).
# bf16 rounds activations to 8 bits of mantissa at every layer: logits differ from an fp32 oracle on the
# same (bf16-rounded) weights by a few % of their scale, so compare relative to the logits' magnitude.
BF16_REL_TOL = 0.1  # measured 2-4% on these models


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_bf16_engine_close_to_transformers(arch):
    hf, cfg, sd = build_hf(arch)
    sd = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    hf.load_state_dict({k: v.float() for k, v in sd.items()})  # the oracle sees the same rounded weights
    ids = torch.randint(3, cfg.vocab_size, (300,), generator=torch.Generator().manual_seed(4)).tolist()
    config = make_engine_config(model=f"hf-{arch}", dtype="bfloat16", token_budget=64, max_model_len=1024,
                                num_blocks=64)
    engine = Engine(config, weights=(cfg, sd), load_tokenizer_=False)
    assert engine.cache.k[0].dtype == torch.bfloat16
    engine.logits_sink = {}
    engine.add_request(ids, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), request_id="r")
    got = None
    while engine.has_unfinished():
        for o in engine.step():
            if o.finished:
                got = o.token_ids
    ours = torch.stack(engine.logits_sink["r"])  # [16, V]: chunked prefill's last row, then 15 decodes
    ref = hf_logits(hf, ids + got[:-1])[len(ids) - 1 :]  # teacher-forced on the tokens we generated
    scale = ref.abs().max().item()
    assert scale > 0.5
    rel = (ours - ref).abs().max().item() / scale
    assert rel <= BF16_REL_TOL, f"{arch}: max |diff| / max |logit| = {rel:.2e}"
    assert rel > 1e-4  # it really ran in bf16 (fp32 agrees to ~1e-6)
