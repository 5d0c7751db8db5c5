"""Errors about the user's input, and how a stage reports them.

An `InputError` says that an input cannot be used: a missing or corrupt file, a checkpoint of the
wrong shape, an empty folder. Its str() names the file and the problem, so that one line is the
whole report; anything else that goes wrong keeps its traceback.
"""
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
