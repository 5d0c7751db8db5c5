"""Reading a torch.save file without running the code a pickle may carry."""
import inspect
import os
import stat

import torch

from common import restricted_pickle

WEIGHTS_ONLY = "weights_only" in inspect.signature(torch.load).parameters   # torch >= 1.13


def load_weights(path):
    """What the torch.save file `path` holds (tensors, dicts, lists, numbers, strings), on the
    CPU; pickle.UnpicklingError for anything that would run code. torch >= 1.13: torch's own
    weights-only loading; torch 1.12: common.restricted_pickle. OSError for a path that is not
    a regular file (opening a named pipe would wait for a writer forever)."""
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError("not a regular file: a pipe, a device or a folder")
    if WEIGHTS_ONLY:
        return torch.load(path, map_location="cpu", weights_only=True)
    return torch.load(path, map_location="cpu", pickle_module=restricted_pickle)
