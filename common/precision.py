"""Mixed precision: the dtype names params.yaml uses, and autocast to one of them."""
import contextlib

import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}   # None: plain fp32


def autocast(device_type, dtype):
    """torch.autocast to `dtype` on `device_type`; dtype None leaves autocast off. (No autocast
    object at all then: torch 1.12, the course's, checks bf16 support even for a disabled one.)"""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)
