"""Errors about the user's input, and how a stage reports them.

An `InputError` says that an input cannot be used: a missing or corrupt file, a checkpoint of the
wrong shape, an empty folder. Its str() names the file and the problem, so that one line is the
whole report; anything else that goes wrong keeps its traceback.
"""
import json
import pickle
import sys
from pathlib import Path

import yaml


class InputError(Exception):
    """An input that cannot be used; str() names the file and the problem."""


class ParamsError(InputError, ValueError):
    """A params.yaml section (or any settings) that cannot be used; str() names where it is."""


PARSERS = {"JSON": (json.loads, json.JSONDecodeError), "YAML": (yaml.safe_load, yaml.YAMLError)}


def read_parsed(path, kind, missing, error=InputError):
    """The value in the `kind` ("JSON" or "YAML") file `path`. Raises `error` with one line that
    names the file: "<path>: <missing>" when there is no such file, "<path>: not valid <kind>
    (...)" when it is not UTF-8 text of that kind, "<path>: cannot read (...)" when it is a
    folder or cannot be opened."""
    parse, parse_error = PARSERS[kind]
    path = Path(path)
    try:
        return parse(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: {missing}") from None
    except (parse_error, UnicodeDecodeError) as e:
        reason = " ".join(str(e).split())   # YAML's reasons run over several lines
        raise error(f"{path}: not valid {kind} ({reason})") from None
    except OSError as e:   # a folder, no permission
        raise error(f"{path}: cannot read ({e.strerror or e})") from None


def read_json(path, missing, error=InputError):
    return read_parsed(path, "JSON", missing, error)


def run_stage(main):
    """Run a stage's main(): an InputError or a missing file ends it with that one line and exit
    status 1, instead of a traceback. The stage dies with the process that started it (dvc)."""
    die_with_parent()
    try:
        main()
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def interruptible(prog, parse_and_run, argv=None):
    """A hand-in script's exit status: `parse_and_run(argv)`'s, or after Ctrl-C one line and 130
    (as a shell reports SIGINT); its outputs are written whole at the end, so none was."""
    try:
        return parse_and_run(argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted: nothing written", file=sys.stderr)
        return 130


def die_with_parent():
    """On Linux, have the kernel kill this process when its parent dies: a `dvc repro` killed
    with SIGKILL would otherwise leave the stage running on, writing outputs that no dvc.lock
    will describe. Elsewhere nothing happens."""
    try:
        import ctypes
        import os
        import signal
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        if libc.prctl(1, signal.SIGKILL) == 0 and os.getppid() != parent:   # 1: PR_SET_PDEATHSIG
            os.kill(os.getpid(), signal.SIGKILL)   # the parent died before we asked
    except (OSError, AttributeError):
        pass


def load_failure(e):
    """Why torch.load(weights_only=True) failed, in a few words: torch's reason, without its
    advice to re-run it unsafely (for a JSON file, say, that would be wrong as well as unsafe)."""
    text = str(e).strip()
    if isinstance(e, pickle.UnpicklingError):
        marker = "WeightsUnpickler error:"
        if marker in text:   # the reason, e.g. "Unsupported global: GLOBAL print was not allowed"
            text = text.split(marker, 1)[1].strip()
        elif text.startswith("Weights only load failed"):
            text = ""
        reason = text.splitlines()[0].split(". ")[0][:200] if text else ""
        return "not a plain tensor file, refused by weights-only loading" + (
            f": {reason}" if reason else "")
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
