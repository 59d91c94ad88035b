"""The package layout keeps its rules (scripts/layout.py): no import cycles, no private names across
modules, no module over 400 lines, no function over 80 lines."""

from __future__ import annotations

import importlib.util
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "layout.py"


def _layout():
    spec = importlib.util.spec_from_file_location("layout", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_package_has_no_cycles_private_imports_or_oversized_code():
    layout = _layout()
    edges, problems = layout.scan()
    problems += [f"cycle: {' <-> '.join(c)}" for c in layout.cycles(edges)]
    assert problems == []


def test_the_checker_finds_a_cycle_and_a_private_import(tmp_path, monkeypatch):
    layout = _layout()
    pkg = tmp_path / "modelfold"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import _hidden\n")
    (pkg / "b.py").write_text("def f():\n    from . import a\n\n\ndef _hidden():\n    pass\n")
    monkeypatch.setattr(layout, "ROOT", pkg)
    edges, problems = layout.scan()
    assert "private: modelfold.a imports _hidden from modelfold.b" in problems
    assert layout.cycles(edges) == [["modelfold.a", "modelfold.b"]]
