"""A csps model as Hugging Face sees it: the config.json of a ``ModelConfig`` and a transformers model on
the same weights. Used to hand the same model to peers (vLLM reads a Hugging Face directory,
``benchmarks/vs_vllm.py``) and to build the transformers oracle on a GPU (``benchmarks/gpu_check.py``)."""

from __future__ import annotations

from csps.config import ModelConfig


def hf_config_dict(cfg: ModelConfig, dtype: str) -> dict:
    """config.json of a Llama-architecture model (the inverse of ``weights.config_from_hf`` for llama)."""
    if cfg.arch != "llama":
        raise ValueError(f"only llama-architecture models are exported, not {cfg.arch}")
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings, "rope_theta": cfg.rope_theta,
        "rope_scaling": cfg.rope_scaling, "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings, "hidden_act": "silu", "attention_bias": cfg.attention_bias,
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_ids[0] if cfg.eos_token_ids else None,
        "torch_dtype": dtype,
    }


def hf_model(cfg: ModelConfig, state_dict: dict, dtype: str, attn_implementation: str = "sdpa"):
    """transformers' LlamaForCausalLM holding ``state_dict``'s tensors themselves (no copy, same device)."""
    import torch
    import transformers

    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg, dtype))
    hf_cfg._attn_implementation = attn_implementation
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"state dict does not fit transformers' Llama: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # buffers are not in the state dict (RoPE's inverse frequencies): build them where the weights are
    device = next(iter(state_dict.values())).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg).to(device)
    return model.eval()
