"""The gated MLP's activation, SiLU(gate) * up over the fused gate/up projection."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    # gate_up: [T, 2·I] (gate columns, then up) -> [T, I]; one temporary (silu's), the product in place
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)
