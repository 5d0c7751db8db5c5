"""`dvc ARGS...` as the scripts run it: the dvc on PATH, else the one installed beside this Python
(the project's .venv, so that `.venv/bin/python -m scripts.sweep` works without activating it)."""
import shutil
import subprocess
import sys
from pathlib import Path


def dvc(*args, capture=False, env=None):
    """Run `dvc *args` (check=True) in `env` (default: this process's environment); its stdout
    when `capture`. Exits with one line when there is no dvc to run."""
    program = shutil.which("dvc") or shutil.which("dvc", path=str(Path(sys.executable).parent))
    if program is None:
        sys.exit("error: no `dvc` on PATH nor beside this Python: run `make env`, then "
                 "`source .venv/bin/activate`")
    result = subprocess.run([program, *args], capture_output=capture, text=True, check=True,
                            env=env)
    return result.stdout if capture else None
