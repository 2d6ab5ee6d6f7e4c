"""A Llama-family decoder in plain PyTorch (Llama 2/3/3.1, Mistral, Qwen2, SmolLM2).

The forward takes a packed batch of variable-length token runs (no padding): ``input_ids [T]``,
``positions [T]`` and an attention callable that owns the paged KV cache and knows which tokens
belong to which sequence (``csps.engine.paged_attention``). Tensor parallelism (Megatron style) shards heads
and the MLP across a TP group: pass ``tp_rank``, ``tp_size`` and a ``tp_comm`` whose
``all_reduce(t, kind)`` sums partial outputs; with ``tp_size == 1`` no communication happens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F

from csps.config import ModelConfig
from csps.core.tp_shard import TPShard, split_range
from csps.kernels import RopeScaling, rms_norm, rope_cos_sin, rope_inv_freq
from csps.kernels.activation import silu_mul
from csps.kernels.norm import add_rms_norm_
from csps.kernels.rope import apply_rope_
from csps.kernels.linear import linear

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class AllReduce(Protocol):
    def all_reduce(self, t: torch.Tensor, kind: str) -> torch.Tensor: ...


@dataclass
class Layer:
    """One decoder layer's weights, in torch's [out, in] layout (``csps.kernels.linear``)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [(Hq_l + 2·Hkv_l)·D, H]
    qkv_bias: torch.Tensor | None
    o_proj: torch.Tensor  # [H, Hq_l·D]
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2·I_l, H]
    down: torch.Tensor  # [H, I_l]


class LlamaModel:
    def __init__(
        self,
        cfg: ModelConfig,
        state_dict: dict[str, torch.Tensor],
        dtype: torch.dtype,
        tp: TPShard | None = None,
        tp_comm: AllReduce | None = None,
        device: torch.device | str = "cpu",
    ) -> None:
        self.cfg = cfg
        self.dtype = dtype
        self.device = torch.device(device)
        self.tp = tp or TPShard()
        self.tp_comm = tp_comm
        if self.tp.tp_size > cfg.num_heads:
            raise ValueError(f"tp {self.tp.tp_size} exceeds the number of heads {cfg.num_heads}")
        q0, q1 = self.tp.head_range(cfg.num_heads)
        k0, k1 = self.tp.kv_head_range(cfg.num_heads, cfg.num_kv_heads)
        self.num_local_heads = q1 - q0
        self.num_local_kv_heads = k1 - k0
        d = cfg.head_dim
        i0, i1 = split_range(cfg.intermediate_size, self.tp.tp_size, self.tp.tp_rank)

        def w(name: str) -> torch.Tensor:
            if name not in state_dict:
                raise KeyError(f"weight {name} missing from the checkpoint")
            return state_dict[name].to(device=self.device, dtype=dtype)

        self.embed = w("model.embed_tokens.weight")
        self.layers: list[Layer] = []
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}."
            q = w(p + "self_attn.q_proj.weight")[q0 * d : q1 * d]
            k = w(p + "self_attn.k_proj.weight")[k0 * d : k1 * d]
            v = w(p + "self_attn.v_proj.weight")[k0 * d : k1 * d]
            bias = None
            if cfg.attention_bias:
                bias = torch.cat([
                    w(p + "self_attn.q_proj.bias")[q0 * d : q1 * d],
                    w(p + "self_attn.k_proj.bias")[k0 * d : k1 * d],
                    w(p + "self_attn.v_proj.bias")[k0 * d : k1 * d],
                ])
            gate = w(p + "mlp.gate_proj.weight")[i0:i1]
            up = w(p + "mlp.up_proj.weight")[i0:i1]
            self.layers.append(Layer(
                input_norm=w(p + "input_layernorm.weight"),
                qkv=torch.cat([q, k, v]),
                qkv_bias=bias,
                o_proj=w(p + "self_attn.o_proj.weight")[:, q0 * d : q1 * d].contiguous(),
                post_norm=w(p + "post_attention_layernorm.weight"),
                gate_up=torch.cat([gate, up]),
                down=w(p + "mlp.down_proj.weight")[:, i0:i1].contiguous(),
            ))
        self.norm = w("model.norm.weight")
        self.lm_head = self.embed if cfg.tie_word_embeddings else w("lm_head.weight")  # [V, H] (tied: the embedding)
        self.inv_freq, self.rope_factor = rope_inv_freq(
            d, cfg.rope_theta, RopeScaling.from_hf(cfg.rope_scaling)
        )
        self.inv_freq = self.inv_freq.to(self.device)
        self.scale = d**-0.5
        self._split = [self.num_local_heads * d, self.num_local_kv_heads * d, self.num_local_kv_heads * d]
        # local query head -> local KV head, where they do not group evenly (uneven TP head splits)
        self.kv_head_map = self.tp.kv_head_map(cfg.num_heads, cfg.num_kv_heads)

    def _reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.tp.tp_size > 1 and self.tp_comm is not None:
            self.tp_comm.all_reduce(t, kind="tp_allreduce")
        return t

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        """input_ids, positions: [T] int64 -> final hidden states [T, H] (before the last norm)."""
        cfg, d = self.cfg, self.cfg.head_dim
        t = input_ids.shape[0]
        x = F.embedding(input_ids, self.embed)  # [T, H]
        cos, sin = rope_cos_sin(positions, self.inv_freq, self.rope_factor, self.dtype)
        # the residual stream x is updated in place; each add is fused with the norm that follows it
        h = rms_norm(x, self.layers[0].input_norm, cfg.rms_norm_eps)
        for i, layer in enumerate(self.layers):
            qkv = linear(h, layer.qkv, layer.qkv_bias)
            # rotate q and k together, in place: one RoPE pass over [T, Hq_l + Hkv_l, D]
            qk = apply_rope_(qkv[:, : self._split[0] + self._split[1]].view(
                t, self.num_local_heads + self.num_local_kv_heads, d), cos, sin)
            q, k = qk[:, : self.num_local_heads], qk[:, self.num_local_heads :]  # [T, Hq_l, D], [T, Hkv_l, D]
            v = qkv[:, self._split[0] + self._split[1] :].reshape(t, self.num_local_kv_heads, d)
            o = attn(i, q, k, v)  # [T, Hq_l, D]
            h = add_rms_norm_(x, self._reduce(linear(o.reshape(t, self.num_local_heads * d), layer.o_proj)),
                              layer.post_norm, cfg.rms_norm_eps)
            mlp_out = self._reduce(linear(silu_mul(linear(h, layer.gate_up)), layer.down))  # [T, H]
            if i + 1 < len(self.layers):
                h = add_rms_norm_(x, mlp_out, self.layers[i + 1].input_norm, cfg.rms_norm_eps)
            else:
                x.add_(mlp_out)
        return x

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, H] (rows to sample) -> logits [N, V] in fp32."""
        h = rms_norm(hidden, self.norm, self.cfg.rms_norm_eps)
        return linear(h, self.lm_head).float()
