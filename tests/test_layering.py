"""Imports go one way (STYLE.md section 2); unit_scaling is never imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "umup_compile"

# module -> the internal modules it may import
ALLOWED: dict[str, set[str]] = {
    "parameter": set(),
    "_rules": {"parameter"},
    "_plan": {"_rules", "parameter"},
    "_rounding": set(),
    "_prologue": set(),
    "_functional": {"_prologue", "_rounding"},
    "_quant": set(),
    "_quant_step": {"_functional", "_prologue", "_quant"},
    "_state8": {"_functional", "_prologue", "_quant", "_quant_step"},
    "_specs": {"_functional", "_plan", "_quant", "_state8"},
    "_groups": {"_plan", "_rules", "_specs", "_state8"},
    "_checkpoint": {"_plan", "_quant", "_specs", "_state8"},
    "_hypers": {"_prologue", "_rounding", "_specs"},
    "_gather": {"_hypers", "_plan", "_specs", "_tensor_check"},
    "_tensor_check": set(),
    "_steady": {"_gather", "_hypers", "_specs", "_tensor_check"},
    "_layout": set(),
    "_aliases": {"_layout"},
    "_pack": {"_aliases", "_layout"},
    "_codegen_hints": set(),
    "_direct": {"_gather"},
    "_engine": {"_codegen_hints", "_direct"},
    "_env": set(),
    "_clip": set(),
    "_calls": {
        "_direct",
        "_gather",
        "_hypers",
        "_layout",
        "_pack",
        "_specs",
        "_steady",
    },
    "_prepare": {"_calls", "_gather", "_pack", "_prologue", "_specs"},
    "_step_clip": {"_clip", "_direct", "_engine", "_prepare"},
    "_traced": {"_calls", "_gather", "_hypers", "_prepare", "_specs", "_step_clip"},
    "_runner": {
        "_calls",
        "_engine",
        "_gather",
        "_hypers",
        "_pack",
        "_prepare",
        "_prologue",
        "_specs",
        "_steady",
        "_step_clip",
        "_traced",
    },
    "_describe": {"_plan", "_rules"},
    "_base": {
        "_checkpoint",
        "_clip",
        "_describe",
        "_engine",
        "_env",
        "_groups",
        "_rules",
        "_runner",
        "_specs",
        "_steady",
    },
    "_optimizers": {"_base", "_rules", "_specs"},
    "optim": {"_describe", "_optimizers", "_plan", "_rules"},
    "__init__": {"optim", "parameter"},
    "_demo_model": {"parameter"},
    "demo": {"_demo_model", "optim"},
    "distributed": {"parameter"},
}


def _imports(path: Path) -> tuple[set[str], set[str]]:
    internal, external = set(), set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                names = [node.module] if node.module else [a.name for a in node.names]
                internal.update(n.split(".")[0] for n in names)
            else:
                external.add((node.module or "").split(".")[0])
        elif isinstance(node, ast.Import):
            external.update(a.name.split(".")[0] for a in node.names)
    return internal, external


def test_layering_covers_every_module() -> None:
    assert {p.stem for p in PACKAGE.glob("*.py")} == set(ALLOWED)


@pytest.mark.parametrize("module", sorted(ALLOWED))
def test_layering_imports_go_one_way(module: str) -> None:
    internal, external = _imports(PACKAGE / f"{module}.py")
    assert internal <= ALLOWED[module], internal - ALLOWED[module]
    # The demo's optional baseline (imported inside try/except; tested without it).
    assert "unit_scaling" not in external or module == "demo"
    assert "umup_compile" not in external  # internal imports are relative


@pytest.mark.parametrize(
    "module", ["_functional", "_prologue", "_quant", "_quant_step", "_rounding"]
)
def test_layering_core_imports_torch_only(module: str) -> None:
    _, external = _imports(PACKAGE / f"{module}.py")
    assert external <= {
        "__future__",
        "collections",
        "dataclasses",
        "math",
        "typing",
        "torch",
    }
