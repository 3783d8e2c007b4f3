"""The hand-written stub of the extension names exactly what the module exports."""

from __future__ import annotations

import ast
from pathlib import Path

import moerust
from moerust import _backend


def test_stub_matches_native_module() -> None:
    stub = Path(moerust.__file__).with_name("_native.pyi")
    tree = ast.parse(stub.read_text())
    declared = {n.name for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
    declared |= {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)}
    exported = {name for name in dir(_backend.native()) if not name.startswith("_")} | {"__version__"}
    assert declared - {"__version__"} == exported - {"__version__"}
