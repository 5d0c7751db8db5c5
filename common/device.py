"""Which torch device a stage or hand-in script runs on."""
import torch

from common.errors import ParamsError


def resolve_device(name=None, what="device"):
    """"auto" (or None): the GPU when there is one, else the CPU. Anything else is checked now, with
    a ParamsError naming `what`, rather than deep inside the first tensor operation: a string
    that is not a CPU or CUDA device ("gpu"), or a CUDA device this machine does not have."""
    if name in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ParamsError(f"{what} {name!r}: not a device this tool runs on; use auto, cpu, cuda "
                          "or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ParamsError(f"{what} {name!r}: no CUDA device is available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ParamsError(f"{what} {name!r}: this machine has {torch.cuda.device_count()} "
                              "CUDA device(s)")
    return str(device)
