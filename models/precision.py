"""Mixed precision: the dtype names params.yaml uses, and autocast to one of them."""
import torch

DTYPES = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}   # None: plain fp32


def autocast(device_type, dtype):
    """torch.autocast to `dtype` on `device_type`; dtype None leaves autocast off."""
    return torch.autocast(device_type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)
