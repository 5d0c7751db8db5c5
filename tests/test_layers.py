"""Imports go one way, down the layers, and only demo/ and the stages know the demo world.

    stages                    one thin script per DVC stage (and the hw3 entry points)
    demo                      the embedded demo world: data, CLIP, vocabulary, GPT-2
    reporting                 figures and the report
    training, inference       the training loop; what hw3_1.sh / hw3_2.sh run
    evaluation                frozen image encoders, the feature cache, scores, zero-shot
    captioning                GPT-2, bridges, PEFT methods, the captioner, decoding, checkpoints
    speed                     opt-in speed tricks, one switch each
    common                    atomic writes, errors, params, device, precision, image reading

A module may import from its own package and from any package of a lower layer.
"""
import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAYERS = [("common",), ("speed",), ("captioning",), ("evaluation",), ("training", "inference"),
          ("reporting",), ("demo",), ("stages",)]
LEVEL = {pkg: i for i, layer in enumerate(LAYERS) for pkg in layer}


def imports(path):
    """Top-level package names of every absolute import in `path`, module or function level."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module.split(".")[0])
    return out & LEVEL.keys()


FILES = sorted(p for pkg in LEVEL for p in (REPO / pkg).rglob("*.py"))


@pytest.mark.parametrize("path", FILES, ids=[p.relative_to(REPO).as_posix() for p in FILES])
def test_imports_go_down(path):
    own = path.relative_to(REPO).parts[0]
    upward = sorted(pkg for pkg in imports(path)
                    if pkg != own and LEVEL[pkg] >= LEVEL[own])
    assert not upward, f"{path.relative_to(REPO)} ({own}) imports {upward}: not below it"


def test_only_demo_and_stages_know_the_demo_world():
    knowing = sorted(p.relative_to(REPO).as_posix() for p in FILES
                     if "demo" in imports(p) and p.relative_to(REPO).parts[0] not in ("demo", "stages"))
    assert not knowing, f"these import demo/: {knowing}"


def test_every_package_has_a_layer():
    packages = {p.parent.name for p in REPO.glob("*/__init__.py")}
    assert packages - {"tests", "bench", "scripts"} <= LEVEL.keys(), packages
