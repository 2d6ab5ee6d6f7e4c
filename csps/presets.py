"""``dummy:<preset>`` models: real architectures with random weights.

The small ones run here (tests, benchmarks); the large ones exist so the cost model and the
simulator can reason about real shapes. All presets share SmolLM2's tokenizer (vocab 49152 fits
inside every preset's vocabulary), so dummy models accept text.
"""

from __future__ import annotations

from csps.config import ModelConfig
from csps.errors import CspsError

SMOLLM2_135M = dict(
    arch="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536, num_layers=30,
    num_heads=9, num_kv_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
)

PRESETS: dict[str, dict] = {
    "tiny": dict(
        arch="llama", vocab_size=49152, hidden_size=64, intermediate_size=192, num_layers=2,
        num_heads=4, num_kv_heads=2, head_dim=16, max_position_embeddings=8192,
        rope_theta=10000.0, tie_word_embeddings=True, bos_token_id=1, eos_token_ids=(2,),
    ),
    "smollm2-135m": SMOLLM2_135M,
    "llama3-8b": dict(
        arch="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "llama3-70b": dict(
        arch="llama", vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_layers=80,
        num_heads=64, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_ids=(128001, 128009),
    ),
    "qwen2-7b": dict(
        arch="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28,
        num_heads=28, num_kv_heads=4, head_dim=128, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, attention_bias=True, eos_token_ids=(151643,),
    ),
    "mistral-7b": dict(
        arch="mistral", vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=32768,
        rope_theta=10000.0, sliding_window=4096, bos_token_id=1, eos_token_ids=(2,),
    ),
}


def preset_config(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise CspsError(f"unknown preset dummy:{name} (available: {', '.join(sorted(PRESETS))})")
    return ModelConfig(name=f"dummy:{name}", **PRESETS[name])


def preset_model_config(model_flag: str) -> ModelConfig | None:
    """The architecture of ``dummy:<preset>`` (and of the embedded SmolLM2) without loading weights."""
    if model_flag.startswith("dummy:"):
        return preset_config(model_flag.split(":", 1)[1])
    if model_flag in ("smollm2", "default"):
        return preset_config("smollm2-135m")
    return None
