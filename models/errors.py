"""Errors about the user's input, and how a stage reports them.

An `InputError` says that an input cannot be used: a missing or corrupt file, a checkpoint of the
wrong shape, an empty folder. Its str() names the file and the problem, so that one line is the
whole report; anything else that goes wrong keeps its traceback.
"""
import pickle
import sys


class InputError(Exception):
    """An input that cannot be used; str() names the file and the problem."""


def run_stage(main):
    """Run a stage's main(): an InputError or a missing file ends it with that one line and exit
    status 1, instead of a traceback."""
    try:
        main()
    except (InputError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


def load_failure(e):
    """Why torch.load(weights_only=True) failed, in a few words: without torch's own advice to
    re-run it unsafely, which for a JSON file, say, would be wrong as well as dangerous."""
    if isinstance(e, pickle.UnpicklingError):
        return ("not a plain tensor file: weights-only loading refuses it (it is no torch file, or "
                "it holds pickled Python objects)")
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__
