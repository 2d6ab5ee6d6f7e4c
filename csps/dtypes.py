"""The dtypes csps computes in, by name: the one place that maps a name to torch and to bytes."""

from __future__ import annotations

DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


def dtype_bytes(name: str) -> int:
    return DTYPE_BYTES[name]


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]
