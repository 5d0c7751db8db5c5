"""Atomic output: write to a temporary file beside the target, then rename over it.

A stage killed mid-write leaves at most a `.tmp-*` file, never a half-written output that a
later stage (or DVC) could mistake for a finished one. The data reach the disk (fsync) before the
rename, so a power cut cannot leave a renamed but empty file either. A long stage also calls
`remove_outputs` first, so a run killed half-way does not leave the previous run's outputs
beside its own, looking like one consistent result.
"""
import contextlib
import glob
import json
import os
import shutil
import tempfile
from pathlib import Path


def _fsync(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path, mode=None):
    """Yield a temporary path in the target's folder; on success it is renamed to `path`, with
    permission bits `mode` (default: the umask's, as for any new file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        # mkstemp's 0600 would survive the rename, as would a writer's own (safetensors replaces
        # the file with a new 0600 one): the umask's permissions, as for any new file
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
        _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(path, inputs=()):
    """Raise ValueError naming `path` now, before long work, when no file can be written there, or
    when the write would replace one of the files `inputs`. The write renames a new file onto
    the folder entry `path` names, so what it replaces is that entry: an input named there (by the
    same path in other words, `./x`, or through a symlink to it) would be lost. A symlink at `path`
    or a hard link to an input is replaced itself and the input stays."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: output path is a folder, expected a file path")
    entry = Path(os.path.realpath(path.parent)) / path.name
    for p in inputs:   # those that are no file (a CLIP model's name, say) cannot be lost
        if p is not None and os.path.exists(p) and Path(os.path.realpath(p)) == entry:
            raise ValueError(f"{path}: is an input ({p}); writing the output there would "
                             "destroy it")
    folder = path.parent
    while not folder.exists():   # missing folders are created at the write
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise ValueError(f"{path}: cannot be written ({folder} is not a writable folder)")


def remove_outputs(*paths):
    """Delete these outputs (files or folders) and the `.tmp-*` leftovers of killed writes."""
    for path in map(Path, paths):
        leftovers = list(path.parent.glob(f".tmp-{glob.escape(path.name)}-*")) if path.parent.is_dir() else []
        for p in [path, *leftovers]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{path.name}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        for file in (p for p in tmp.rglob("*") if p.is_file()):
            _fsync(file)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Like open(path, mode) for writing, but the file appears only once it is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path, obj, indent=2):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
