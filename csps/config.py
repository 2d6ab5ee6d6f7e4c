"""Frozen configuration dataclasses, validated on construction. Defaults run on this CPU."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from csps.core.tp_shard import max_kv_heads_per_rank
from csps.errors import CspsError

DTYPES = ("auto", "bfloat16", "float32")
DEVICES = ("auto", "cpu", "cuda")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CspsError(msg)


def check_token_budget(token_budget: int, block_size: int) -> None:
    """Chunks are whole KV blocks: the per-rank token budget is a positive multiple of the block size
    (the block size itself is ``CacheConfig.block_size``, its one home)."""
    _check(token_budget >= block_size,
           f"token budget ({token_budget}) must be at least the block size ({block_size})")
    _check(token_budget % block_size == 0,
           f"token budget ({token_budget}) must be a multiple of the block size ({block_size})")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-family decoder (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2)."""

    arch: str  # llama | mistral | qwen2
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # Hugging Face rope_scaling / rope_parameters dict
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: bias on q/k/v
    sliding_window: int | None = None  # Mistral
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = ""

    def __post_init__(self) -> None:
        _check(self.arch in ("llama", "mistral", "qwen2"), f"unsupported architecture {self.arch!r}")
        for f in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                  "num_kv_heads", "head_dim", "max_position_embeddings"):
            _check(getattr(self, f) > 0, f"model config: {f} must be positive")
        _check(self.num_heads % self.num_kv_heads == 0,
               f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        _check(self.sliding_window is None or self.sliding_window > 0, "sliding_window must be positive")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def num_params(self) -> int:
        h, i, L = self.hidden_size, self.intermediate_size, self.num_layers
        per_layer = h * (self.q_size + 2 * self.kv_size) + self.q_size * h + 3 * h * i + 2 * h
        if self.attention_bias:
            per_layer += self.q_size + 2 * self.kv_size
        emb = self.vocab_size * h
        return L * per_layer + emb * (1 if self.tie_word_embeddings else 2) + h

    def kv_bytes_per_token(self, dtype_bytes: int, tp: int = 1) -> int:
        """KV-cache bytes of one token on one TP rank (the rank holding the most KV heads)."""
        return 2 * self.num_layers * max_kv_heads_per_rank(self.num_heads, self.num_kv_heads, tp) * self.head_dim * dtype_bytes


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None  # None: derived from kv_cache_bytes
    kv_cache_bytes: int | None = None  # per rank; None: a share of free memory (see engine)
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        _check(self.block_size > 0 and self.block_size & (self.block_size - 1) == 0,
               f"block_size must be a power of two, got {self.block_size}")
        _check(self.num_blocks is None or self.num_blocks >= 2, "num_blocks must be at least 2")
        _check(self.kv_cache_bytes is None or self.kv_cache_bytes > 0, "kv_cache_bytes must be positive")


@dataclass(frozen=True)
class SchedulerConfig:
    token_budget: int = 512  # tokens per rank per step (Sarathi-Serve's tau)
    max_num_seqs: int = 256
    max_model_len: int = 8192
    max_waiting: int = 1024  # the server answers 429 beyond this
    policy: str = "stall-free"  # stall-free | prefill-first
    # Medha's adaptive chunking: in steps that carry decodes, prefill chunks shrink so the step's predicted
    # time stays within a budget (the token budget stays an upper bound); the budget is step_time_budget_ms,
    # or, when None, the time of the step's decodes plus the fresh chunk the token budget leaves them (so a
    # chunk on a long cache costs no more than a fresh one)
    adaptive_chunking: bool = True
    step_time_budget_ms: float | None = None

    def __post_init__(self) -> None:
        _check(self.policy in ("stall-free", "prefill-first"),
               f"unknown schedule policy {self.policy!r} (stall-free | prefill-first)")
        _check(self.token_budget > 0, f"token budget must be positive, got {self.token_budget}")
        _check(self.max_num_seqs > 0, "max_num_seqs must be positive")
        _check(self.max_model_len > 0, "max_model_len must be positive")
        _check(self.step_time_budget_ms is None or self.step_time_budget_ms > 0,
               f"step_time_budget_ms must be positive, got {self.step_time_budget_ms}")


@dataclass(frozen=True)
class ParallelConfig:
    sp: int = 1
    tp: int = 1
    sp_attn: str = "ring"  # ring | ulysses (prefill exchange); decode always uses pass-Q
    sp_exchange: str = "auto"  # with ring: auto (Meta's rule, calibrated) | pass_kv | pass_q
    sp_threshold_tokens: int = 4096  # prompts longer than this are sequence-parallel
    backend: str = "auto"  # auto | gloo | nccl

    def __post_init__(self) -> None:
        _check(self.sp >= 1 and self.tp >= 1, f"sp and tp must be >= 1 (got sp={self.sp}, tp={self.tp})")
        _check(self.sp_attn in ("ring", "ulysses"), f"unknown --sp-attn {self.sp_attn!r} (ring | ulysses)")
        _check(self.backend in ("auto", "gloo", "nccl"), f"unknown backend {self.backend!r}")
        _check(self.sp_exchange in ("auto", "pass_kv", "pass_q"),
               f"unknown --sp-exchange {self.sp_exchange!r} (auto | pass_kv | pass_q)")
        _check(self.sp_threshold_tokens >= 1, "sp_threshold_tokens must be positive")

    @property
    def world_size(self) -> int:
        return self.sp * self.tp


@dataclass(frozen=True)
class EngineConfig:
    model: str = "smollm2"
    device: str = "auto"  # auto: cuda where a CUDA device is available, else cpu
    dtype: str = "auto"  # auto: bf16 where the hardware computes it natively, else fp32
    seed: int = 0
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    debug_fault: tuple[int, int] | None = None  # tests only: (world rank, step id) raises there

    def __post_init__(self) -> None:
        _check(self.dtype in DTYPES, f"unknown dtype {self.dtype!r} (choose from {', '.join(DTYPES)})")
        _check(self.device in DEVICES, f"unknown device {self.device!r} (choose from {', '.join(DEVICES)})")
        from csps.device import resolve_device, resolve_dtype

        object.__setattr__(self, "device", resolve_device(self.device))
        object.__setattr__(self, "dtype", resolve_dtype(self.dtype, self.device))
        check_token_budget(self.scheduler.token_budget, self.cache.block_size)

    def with_(self, **kw) -> EngineConfig:
        return replace(self, **kw)
