"""Imports point down only (STYLE.md): kernels import nothing of ours; models import kernels; packing and
sharding import neither models nor each other; only orchestration and the CLI read config.py."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "raytune_llm"

# layer -> layers of ours it may import (besides itself)
ALLOWED = {
    "kernels": set(),
    "models": {"kernels"},
    "packing": set(),
    "sharding": set(),
    "export": {"models", "kernels"},
    "train": {"config", "config_save", "models", "kernels", "packing", "sharding", "export"},
    "tune": {"config", "config_save", "train", "models", "kernels", "packing", "sharding", "export"},
    "config": set(),
    "config_save": {"config"},
    "cli": {"config", "train", "tune", "export", "sharding", "packing"},
    "__init__": {"models", "config"},
    "__main__": {"cli"},
}


def _layer(path: Path) -> str:
    rel = path.relative_to(PKG)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _our_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom) and node.level > 0:
            # resolve `from ..x import y` against the file's package
            pkg = list(path.relative_to(PKG.parent).with_suffix("").parts[:-1])
            base = pkg[: len(pkg) - (node.level - 1)]
            names = [".".join(base + ([node.module] if node.module else []))]
        for n in names:
            parts = n.split(".")
            if parts[0] == "raytune_llm" and len(parts) > 1:
                found.add(parts[1])
    return found


def test_imports_point_down_only():
    problems = []
    for path in sorted(PKG.rglob("*.py")):
        layer = _layer(path)
        allowed = ALLOWED.get(layer)
        assert allowed is not None, f"{path}: unknown layer {layer!r}; add it to ALLOWED"
        for imported in _our_imports(path) - {layer}:
            if imported not in allowed:
                problems.append(f"{path.relative_to(PKG.parent)} ({layer}) imports raytune_llm.{imported}")
    assert not problems, "\n".join(problems)


def test_kernels_import_only_torch_and_triton():
    stdlib_ok = {
        "__future__", "math", "os", "typing", "functools", "dataclasses", "collections", "contextlib", "enum", "warnings"
    }  # fmt: skip
    for path in sorted((PKG / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import | ast.ImportFrom):
                mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                for m in mods:
                    top = m.split(".")[0]
                    assert top in {"torch", "triton", "raytune_llm"} | stdlib_ok, f"{path.name} imports {m}"
