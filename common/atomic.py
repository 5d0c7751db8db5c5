"""Atomic output: write to a temporary file beside the target, then rename over it.

A stage killed mid-write leaves at most a temporary file, never a half-written output that a
later stage (or DVC) could mistake for a finished one. The data reach the disk (fsync) before the
rename, so a power cut cannot leave a renamed but empty file either. A long stage also calls
`remove_outputs` first, so a run killed half-way does not leave the previous run's outputs
beside its own, looking like one consistent result.

Temporary files (and folders) are named `.tmp-<output name>-pid<writer's pid>-<random>.partial`:
hidden, and ending in `.partial`, never in the output's own suffix, so that no glob for outputs
(`features/*.h5`) and no tool takes one for an output. A killed writer's leftover is removed by
`remove_outputs` at its stage's next start, and by any later write into its folder once the
process its name gives is no longer running. (DVC restoring a stage's outputs from its run cache
runs no code: a leftover stays until the next write there, still unmistakable.)

`check_writable` is what the hw3 scripts ask before the long work: the output path can be
written (a file can be created in its folder), is no device or other non-file, and names none
of the inputs. Errors of a write name the output, not its temporary file.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

PARTIAL = ".partial"
_LEFTOVER = re.compile(r"\.tmp-.+-pid(\d+)-[^/]*" + re.escape(PARTIAL))


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


def _short(name, limit=128):
    """The output's name as its temporary names carry it: cut, so that with the prefix, pid,
    random part and suffix it stays within a file system's 255 bytes."""
    return name if len(os.fsencode(name)) <= limit else os.fsdecode(os.fsencode(name)[:limit])


def _tmp_prefix(path):
    return f".tmp-{_short(Path(path).name)}-pid{os.getpid()}-"


def _running(pid):
    """False only when no process `pid` exists (here, in this PID namespace)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:   # EPERM: another user's process
        return True
    return True


def _remove(p):
    try:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    except FileNotFoundError:   # another process cleaned it first
        pass


def remove_stale_leftovers(folder):
    """Remove the temporary files and folders in `folder` that a writer no longer running left
    (killed mid-write). Returns their paths. Those of running writers stay."""
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    stale = [Path(folder) / n for n in sorted(names)
             if (m := _LEFTOVER.fullmatch(n)) and not _running(int(m.group(1)))]
    for p in stale:
        try:
            _remove(p)
        except OSError:   # not ours to remove after all: it stays, as unmistakable as before
            pass
    return stale


def _naming(e, path, tmp=None):
    """The OSError `e` of writing `path`, saying `path` where it said its temporary file (`tmp`,
    or any of its temporary names) or no file at all: a user knows the output path, never the
    temporary one."""
    def temporary(name):
        return name is not None and (name == tmp or os.path.basename(str(name)).startswith(
            _tmp_prefix(path)))
    try:
        if e.errno is not None and (e.filename is None or temporary(e.filename)):
            return type(e)(e.errno, e.strerror, str(path))
        if tmp and tmp in str(e):   # a library's own message (h5py) quoting the file
            return type(e)(str(e).replace(tmp, str(path)))
    except Exception:   # a subclass with another constructor
        pass
    return e


@contextlib.contextmanager
def atomic_path(path, mode=None):
    """Yield a temporary path in the target's folder; on success it is renamed to `path`, with
    permission bits `mode` (default: the umask's, as for any new file), and the leftovers of
    killed writes in that folder are removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=PARTIAL, dir=path.parent)
        os.close(fd)
    except OSError as e:
        raise _naming(e, path) from e
    try:
        try:
            yield Path(tmp)
            # mkstemp's 0600 would survive the rename, as would a writer's own (safetensors
            # replaces the file with a new 0600 one): the umask's permissions, as for any new file
            os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)
            _fsync(tmp)
            os.replace(tmp, path)
        except OSError as e:
            new = _naming(e, path, tmp)
            if new is e:
                raise
            raise new from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    remove_stale_leftovers(path.parent)


def _kind(path):
    mode = os.stat(path).st_mode
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _entry(p):
    """The folder entry that path `p` names: its folder resolved, its own name kept."""
    p = Path(p)
    return Path(os.path.realpath(p.parent)) / p.name


SYSTEM_FOLDERS = ("/dev", "/proc", "/sys")   # /dev/shm excepted: ordinary files in memory


def _system_folder(folder):
    """The system folder (/dev, /proc, /sys) that the resolved `folder` is or lies in, else None."""
    folder = str(folder)
    if os.name != "posix" or folder == "/dev/shm" or folder.startswith("/dev/shm/"):
        return None
    return next((s for s in SYSTEM_FOLDERS if folder == s or folder.startswith(s + "/")), None)


def check_writable(path, inputs=()):
    """Raise ValueError naming `path` now, before long work, when no file can be written there, or
    when the write would replace one of the files `inputs`.

    The write creates a temporary file in the folder and renames it onto the entry `path` names,
    so: a folder, a device, a pipe or a socket there is refused (the rename would replace a
    device node; a folder cannot be replaced), and so is any path in /dev, /proc or /sys (as
    root, `/dev/stdout` when stdout is a file passes every other test, and the rename would
    replace that link; /dev/shm is allowed); a folder in which no file can be created
    (read-only, no permission) is refused after one try to create one; an input named there
    is refused, whether by the same path in other words (`./x`), through a symlink to it, or as
    the symlink that names it (a hub cache's snapshot entry). A symlink at `path` to an input
    that is not itself an input, or a hard link to an input, is replaced itself and the input
    stays. Missing folders are fine (the write creates them)."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: output path is a folder, expected a file path")
    if path.exists() and not path.is_file():
        raise ValueError(f"{path}: output path is {_kind(path)}, not a file: the output is "
                         "written to a new file renamed onto that name, which would replace it")
    entry = _entry(path)
    system = _system_folder(entry.parent)
    if system:   # /dev/stdout: a link to the caller's stdout, which the rename would replace
        raise ValueError(f"{path}: output path is in {system}, the system's devices and kernel "
                         "files, not a place for an output file")
    for p in inputs:   # those that are no file (a CLIP model's name, say) cannot be lost
        if p is not None and os.path.lexists(p) and entry in (Path(os.path.realpath(p)), _entry(p)):
            raise ValueError(f"{path}: is an input ({p}); writing the output there would "
                             "destroy it")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:   # missing folders: created at the write
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path}: cannot be written ({folder} is not a writable folder)")
    try:   # the only sure test: /proc, /sys and read-only mounts pass os.access for root
        fd, probe = tempfile.mkstemp(prefix=_tmp_prefix(path), suffix=PARTIAL, dir=folder)
    except OSError as e:
        raise ValueError(f"{path}: cannot be written ({folder} is not a writable folder: "
                         f"{e.strerror or e})") from None
    os.close(fd)
    os.unlink(probe)


def remove_outputs(*paths):
    """Delete these outputs (files or folders) and the `.tmp-*` leftovers of killed writes."""
    for path in map(Path, paths):
        pattern = f".tmp-{glob.escape(_short(path.name))}-*"
        leftovers = list(path.parent.glob(pattern)) if path.parent.is_dir() else []
        for p in [path, *leftovers]:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            elif p.exists() or p.is_symlink():
                p.unlink()


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder beside `path`; on success it replaces `path` whole (the old one
    is renamed away first and deleted after: `path` is missing for two renames, not a delete)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=PARTIAL, dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp's 0700 would survive the rename
    try:
        yield tmp
        for file in (p for p in tmp.rglob("*") if p.is_file()):
            _fsync(file)
        old = None
        if path.is_dir() and not path.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=_tmp_prefix(path), suffix=PARTIAL, dir=path.parent))
            os.replace(path, old)   # onto an empty folder: allowed
        elif path.exists() or path.is_symlink():
            path.unlink()
        try:
            os.replace(tmp, path)
        except OSError:
            if old is not None:
                os.replace(old, path)   # the previous folder back
            raise
        if old is not None:
            shutil.rmtree(old)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    remove_stale_leftovers(path.parent)


@contextlib.contextmanager
def atomic_open(path, mode="w", **kwargs):
    """Like open(path, mode) for writing, but the file appears only once it is complete."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_json(path, obj, indent=2):
    with atomic_open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=indent, ensure_ascii=False)
        f.write("\n")
