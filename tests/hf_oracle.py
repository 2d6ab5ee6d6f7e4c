"""Independent oracles: Hugging Face transformers models built from the same config and weights."""

from __future__ import annotations

import torch

from csps.engine.weights import config_from_hf

BASE = dict(
    vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    rms_norm_eps=1e-5, initializer_range=0.2, tie_word_embeddings=False,
    bos_token_id=1, eos_token_id=2, pad_token_id=0,
)

ARCHS = {
    # Llama 3.1 style: GQA + llama3 RoPE scaling
    "llama": dict(rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 256}),
    "llama-yarn": dict(rope_theta=10000.0, rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 256}),
    "llama-linear": dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": dict(rope_theta=1000000.0),
    "mistral": dict(rope_theta=10000.0, sliding_window=48),
}


def build_hf(arch: str, seed: int = 0, **overrides):
    """(hf_model in fp32 eval mode, our ModelConfig, state dict) for an architecture key."""
    import transformers

    torch.manual_seed(seed)
    kw = dict(BASE, **ARCHS[arch], **overrides)
    family = arch.split("-")[0]
    cls_cfg = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
               "mistral": transformers.MistralConfig}[family]
    cls_model = {"llama": transformers.LlamaForCausalLM, "qwen2": transformers.Qwen2ForCausalLM,
                 "mistral": transformers.MistralForCausalLM}[family]
    if family == "qwen2" and "use_sliding_window" not in kw:
        kw["use_sliding_window"] = False
    hf_cfg = cls_cfg(**kw)
    hf_cfg._attn_implementation = "eager"
    model = cls_model(hf_cfg).float().eval()
    cfg_dict = hf_cfg.to_dict()
    cfg_dict["model_type"] = family
    ours = config_from_hf(cfg_dict, name=f"hf-{arch}")
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return model, ours, sd


@torch.inference_mode()
def hf_logits(model, ids: list[int]) -> torch.Tensor:
    return model(torch.tensor([ids])).logits[0].float()


@torch.inference_mode()
def hf_greedy(model, ids: list[int], n: int) -> list[int]:
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         min_new_tokens=n,
                         pad_token_id=0, eos_token_id=None)
    return out[0, len(ids):].tolist()
