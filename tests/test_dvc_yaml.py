"""dvc.yaml lists, for every stage, each file of this repository whose code the stage runs, and no
other. A module missing from a stage's deps means a change to it never re-runs the stage: `dvc
repro` would keep results computed by the old code and call them up to date. A module listed that
the stage does not run re-runs it for nothing (an extraction, a training). The code a stage runs
is the closure of the imports (module level and inside functions) of its `python -m` module over
the repository's packages; a package folder among the deps stands for all its files.
"""
import ast
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "captioning", "evaluation", "training", "inference", "reporting", "demo", "stages")


def module_file(name):
    for path in (REPO / (name.replace(".", "/") + ".py"), REPO / name.replace(".", "/") / "__init__.py"):
        if path.is_file() and path.relative_to(REPO).parts[0] in PACKAGES:
            return path
    return None


def imported_names(path):
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # submodules
    return names


def code_of(module):
    """Repository files run by `python -m module`, empty package __init__ files left out."""
    seen, todo = set(), [module_file(module)]
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in imported_names(path):
            parts = name.split(".")   # importing a.b.c runs a/__init__ and a/b/__init__ too
            todo += [f for f in (module_file(".".join(parts[:i])) for i in range(1, len(parts) + 1)) if f]
    return {p.relative_to(REPO).as_posix() for p in seen if p.read_text(encoding="utf-8").strip()}


def stages():
    doc = yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))
    for name, stage in doc["stages"].items():
        yield name, stage.get("do", stage)


@pytest.mark.parametrize("name,stage", list(stages()), ids=[n for n, _ in stages()])
def test_every_module_a_stage_runs_is_one_of_its_deps(name, stage):
    cmd = stage["cmd"].split()
    assert cmd[:3] == ["python", "-m", cmd[2]] and cmd[2].startswith("stages."), stage["cmd"]
    deps = [str(d).rstrip("/") for d in stage.get("deps", [])]
    missing = sorted(f for f in code_of(cmd[2])
                     if not any(f == d or f.startswith(d + "/") for d in deps))
    assert not missing, f"dvc.yaml stage {name}: add to deps: {missing}"


@pytest.mark.parametrize("name,stage", list(stages()), ids=[n for n, _ in stages()])
def test_every_code_dep_of_a_stage_is_code_it_runs(name, stage):
    runs = code_of(stage["cmd"].split()[2])
    listed = [str(d).rstrip("/") for d in stage.get("deps", [])
              if str(d).split("/")[0] in PACKAGES]
    unused = sorted(f for d in listed for f in code_files(d) if f not in runs)
    assert not unused, f"dvc.yaml stage {name}: deps it does not run: {unused}"


def code_files(dep):
    """The non-empty .py files a dep (a file or a package folder) stands for."""
    path = REPO / dep
    files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return [p.relative_to(REPO).as_posix() for p in files if p.read_text(encoding="utf-8").strip()]


def test_the_import_closure_follows_function_level_imports():
    files = code_of("stages.hw3_2")
    assert {"stages/hw3_2.py", "inference/release.py", "inference/caption_folder.py",
            "captioning/peft/lora.py", "evaluation/clip_io.py"} <= files
    assert "evaluation/zeroshot.py" not in files and "common/__init__.py" not in files
