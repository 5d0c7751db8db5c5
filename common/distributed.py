"""A stage as several processes under `torchrun` (torch.distributed.run): one per GPU (NCCL) or
per CPU core (gloo), on one machine or several (c10d rendezvous). PyTorch's launcher and
collectives only; nothing here schedules, transports or restarts anything itself.

- `launched()`: this process was started by torchrun (its RANK, WORLD_SIZE, LOCAL_RANK, ... are
  in the environment). Outside torchrun every stage is the plain single process.
- `joined(device, what)`: a context in which this process is one rank of the run: the process
  group is joined (NCCL on GPUs, gloo on the CPU), with a timeout on every collective
  (HW3_DIST_TIMEOUT seconds, default 1800); yields a `Ranks`, or None outside torchrun. A
  collective that fails because another rank stopped, or timed out, ends this rank with one line.
- `relaunch(module, argv, nproc, device, what)`: run `python -m module argv` as `nproc` processes
  under `torchrun --standalone` from inside this process (a stage whose params ask for more than
  one process re-runs itself so; the command DVC records stays `python -m stages.x ...`).
- `check_nproc(nproc, device, what)`: nproc processes fit this machine: at least 1, at most its
  GPUs (one each) or its CPU cores.
"""
import contextlib
import datetime
import inspect
import os
import signal
import sys

import torch
import torch.distributed as dist

from common.device import resolve_device
from common.errors import ParamsError

TIMEOUT_ENV = "HW3_DIST_TIMEOUT"
# exit statuses of a rank that stopped because of another: a collective failed or timed out, or
# torchrun sent SIGTERM (128 + 15); relaunch() names the process that failed first of its own
LOST_CONTACT, STOPPED = 70, 143
DEFAULT_TIMEOUT_S = 1800   # long enough for rank 0's per-epoch evaluation while the others wait
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


def launched():
    """True in a process that torchrun started (its rank and world are in the environment)."""
    return all(k in os.environ for k in TORCHRUN_ENV)


def cpu_cores():
    """The CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def device_kind(name=None, what="device"):
    """"cuda" or "cpu" for a device setting ("auto"/None: a GPU when there is one); a setting
    that is no device of this machine is a ParamsError naming `what`."""
    return torch.device(resolve_device(name, what)).type


def check_nproc(nproc, device=None, what="nproc_per_node"):
    """Refuse (ParamsError naming `what`) a process count that is not at least 1, or more
    processes than this machine has GPUs (CUDA_VISIBLE_DEVICES counts) or CPU cores."""
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise ParamsError(f"{what}={nproc!r}: must be a whole number of at least 1")
    kind = device_kind(device)
    if kind == "cuda":
        have = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if nproc > have:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            seen = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
            raise ParamsError(f"{what}={nproc}: this machine has {have} GPU(s){seen}: one "
                              "process per GPU at most")
    elif nproc > cpu_cores():
        raise ParamsError(f"{what}={nproc}: this machine gives this process {cpu_cores()} CPU "
                          "core(s): one process per core at most")


def timeout():
    text = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1
    if not seconds > 0:
        raise ParamsError(f"{TIMEOUT_ENV}={text!r}: expected a number of seconds above 0")
    return datetime.timedelta(seconds=seconds)


def _env_int(name):
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise ParamsError(f"{name}={os.environ.get(name)!r}: torchrun sets it to a whole number; "
                          "start the stage with torchrun (README: Scale-out)") from None


class Ranks:
    """This process's place among the `world_size` processes of a run, and the collectives the
    stages use. `device`: this rank's device (cuda:LOCAL_RANK on GPUs). Objects travel through a
    gloo group (CPU to CPU) whatever the main backend is."""

    def __init__(self, rank, world_size, local_rank, local_world_size, device, objects=None):
        self.rank, self.world_size = rank, world_size
        self.local_rank, self.local_world_size = local_rank, local_world_size
        self.device = torch.device(device)
        self.objects = objects   # None: the default group (gloo already)

    @property
    def is_main(self):
        return self.rank == 0

    def __repr__(self):
        return f"rank {self.rank} of {self.world_size}"

    # --- shares -------------------------------------------------------------------------------

    def share(self, items):
        """This rank's contiguous part of `items`: the parts of the ranks in order are `items`,
        their lengths differ by one at most (the first len % world_size ranks have one more)."""
        n, k = len(items), self.world_size
        start = self.rank * (n // k) + min(self.rank, n % k)
        return items[start:start + n // k + (self.rank < n % k)]

    def blocks(self, n, size):
        """Indices of this rank's blocks of `size` consecutive items among `n`: block b (items
        b*size ...) belongs to rank b % world_size, so a rank's items, taken `size` at a time,
        make exactly the blocks one process would make."""
        return [i for b in range(self.rank, -(-n // size), self.world_size)
                for i in range(b * size, min(n, (b + 1) * size))]

    # --- collectives ----------------------------------------------------------------------------

    def sum_(self, tensor):
        """Sum `tensor` over the ranks, in place (every rank gets the sum)."""
        dist.all_reduce(tensor)
        return tensor

    def gather(self, obj):
        """[every rank's obj] on rank 0 (in rank order); None on the others."""
        out = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, out, dst=0, group=self.objects)
        return out

    def barrier(self):
        dist.barrier(group=self.objects)

    def data_parallel(self, module):
        """`module` in DistributedDataParallel, its gradients SUMMED over the ranks (not averaged:
        each rank weights its own loss by its share of the batch), in fp32 even for low-precision
        parameters. Every trainable parameter must take part in every forward (true of every
        bridge and PEFT method here; DDP names any that does not at the second step). Buffers are
        not re-sent at each forward: the model's are constant."""
        ddp = torch.nn.parallel.DistributedDataParallel
        buffers = ({"forward_sync_buffers": False}
                   if "forward_sync_buffers" in inspect.signature(ddp).parameters
                   else {"broadcast_buffers": False})
        gpu = [self.device.index] if self.device.type == "cuda" else None
        wrapped = ddp(module, device_ids=gpu, **buffers)
        wrapped.register_comm_hook(None, _sum_in_fp32)
        return wrapped


def _sum_in_fp32(group, bucket):
    """DDP comm hook: the bucket's gradients summed over the ranks, accumulated in fp32."""
    buffer = bucket.buffer()
    work = buffer if buffer.dtype in (torch.float32, torch.float64) else buffer.float()
    future = dist.all_reduce(work, group=group, async_op=True).get_future()

    def back(fut):
        summed = fut.value()[0]
        if summed is not buffer:
            buffer.copy_(summed)
        return buffer
    return future.then(back)


def rank_device(name=None, what="device"):
    """This rank's device for a device setting: on GPUs cuda:LOCAL_RANK (a setting naming one GPU,
    cuda:N, is refused for more than one process per machine); else the CPU."""
    local_world = _env_int("LOCAL_WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK")
    kind = device_kind(name, what)
    check_nproc(local_world, kind, "torchrun --nproc-per-node")
    if kind != "cuda":
        return torch.device("cpu")
    if name not in (None, "", "auto", "cuda"):
        if local_world > 1:
            raise ParamsError(f"{what} {name!r}: names one GPU, but torchrun starts {local_world} "
                              "processes on this machine (one GPU each): use auto or cuda")
        return torch.device(resolve_device(name, what))
    return torch.device("cuda", local_rank)


@contextlib.contextmanager
def joined(device=None, what="stage"):
    """Inside: this process joined the run's process group (None outside torchrun: nothing to
    join). A collective that fails (a rank died, the network broke, HW3_DIST_TIMEOUT passed) ends
    the process with one line instead of a traceback; the group is left on the way out."""
    if not launched():
        yield None
        return
    rank, world = _env_int("RANK"), _env_int("WORLD_SIZE")
    device = rank_device(device, f"{what}: device")
    wait = timeout()
    try:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=wait,
                                device_id=device if device.type == "cuda" else None)
        objects = dist.new_group(backend="gloo", timeout=wait) if device.type == "cuda" else None
    except (RuntimeError, ValueError) as e:   # DistError is one; ValueError: MASTER_ADDR unset
        _leave()
        raise SystemExit(f"error: {what}: rank {rank} of {world}: could not join the run's "
                         f"process group ({_first_line(e)})") from None
    ranks = Ranks(rank, world, _env_int("LOCAL_RANK"), _env_int("LOCAL_WORLD_SIZE"), device,
                  objects)
    stop = _stopped_by_sigterm(f"error: {what}: {ranks}: stopped by SIGTERM (torchrun stops every "
                               "process of a run when one fails, or when it is stopped itself)")
    try:
        yield ranks
    except RuntimeError as e:
        if not is_collective_failure(e):
            raise
        print(f"error: {what}: {ranks}: stopped: another process of the run failed, or could not "
              f"be reached within {TIMEOUT_ENV}={wait.total_seconds():g} s ({_first_line(e)})",
              file=sys.stderr)
        raise SystemExit(LOST_CONTACT) from None
    finally:
        stop()
        _leave()


def _stopped_by_sigterm(message):
    """Until the returned function is called, SIGTERM raises SystemExit(message) in this process,
    so that its `finally` clauses run (a temporary output file is removed, not left behind).
    Returns the function that puts the previous handler back."""
    def handler(signum, frame):
        print(message, file=sys.stderr)
        raise SystemExit(STOPPED)
    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:   # not the main thread: leave signals alone
        return lambda: None
    return lambda: signal.signal(signal.SIGTERM, previous)


def is_collective_failure(error):
    """A collective that failed: a peer gone, the network, a timeout (torch raises DistError
    subclasses, some backends a plain RuntimeError naming themselves)."""
    if isinstance(error, dist.DistError):
        return True
    text = str(error)
    return any(k in text for k in ("Gloo", "gloo", "NCCL", "c10d", "Connection closed",
                                   "Connection reset", "Timed out", "timed out"))


def _first_line(error):
    text = str(error).strip()
    return text.splitlines()[0][:300] if text else type(error).__name__


def _leave():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def relaunch(module, argv, nproc, device=None, what="stage"):
    """Run `python -m module *argv` as `nproc` processes on this machine under `torchrun
    --standalone` (a free port, so several runs may share a machine), in this process; return
    once all have finished. One that fails stops the others (torchrun's own supervision); this
    then ends with one line naming it (its own error is printed above)."""
    check_nproc(nproc, device, what)
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    args = ["--standalone", "--nnodes", "1", "--nproc-per-node", str(nproc), "--max-restarts", "0",
            "-m", module, *argv]
    print(f"{what}: {nproc} processes: torchrun {' '.join(args)}", file=sys.stderr)
    try:
        torchrun.main(args)
    except ChildFailedError as e:
        raise SystemExit(f"error: {what}: {failure_summary(e.failures, nproc)}") from None


def failure_summary(failures, nproc):
    """One line on a failed run from torchrun's {rank: ProcessFailure}: the process that failed
    of its own accord (not stopped by torchrun, not lost contact with the others), first."""
    def how(code):
        if code is not None and code < 0:
            try:
                return f"was killed by signal {-code} ({signal.Signals(-code).name})"
            except ValueError:
                return f"was killed by signal {-code}"
        return f"exited with status {code}"
    own = {r: f for r, f in failures.items() if f.exitcode not in (LOST_CONTACT, STOPPED, -15)}
    if own:
        rank = min(own, key=lambda r: (own[r].timestamp, r))
        return (f"process {rank} of {nproc} {how(own[rank].exitcode)} (its error, if any, is "
                "above); torchrun stopped the others")
    rank = min(failures, key=lambda r: (failures[r].timestamp, r))
    return (f"process {rank} of {nproc} lost contact with the others (a collective failed or "
            f"timed out, {TIMEOUT_ENV}; see above); torchrun stopped the others")
