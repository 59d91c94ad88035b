"""The package layout keeps its rules (scripts/layout.py): no import cycles, no import up the layers, no
private names across modules, no module over 400 lines, no function over 80 lines."""

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


def test_the_checker_finds_an_import_up_the_layers(tmp_path, monkeypatch):
    layout = _layout()
    pkg = tmp_path / "modelfold"
    (pkg / "traced").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from .api import fold\n")
    (pkg / "traced" / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("def f():\n    from .traced import engine\n")  # shared room -> engine
    (pkg / "traced" / "engine.py").write_text("from ..errors import f\n\n\ndef g():\n    from ..api import fold\n")
    (pkg / "api.py").write_text("from .traced.engine import g\n\n\ndef fold():\n    pass\n")
    (pkg / "old.py").write_text('"""Alias of modelfold.traced.engine."""\nfrom .traced.engine import g\n')
    (pkg / "extra.py").write_text("")
    monkeypatch.setattr(layout, "ROOT", pkg)
    _, problems = layout.scan()
    assert sorted(p for p in problems if p.startswith("layer:")) == [
        "layer: modelfold.errors imports modelfold.traced.engine from a higher layer",
        "layer: modelfold.extra is in no layer (add it to LAYERS)",
        "layer: modelfold.traced.engine imports modelfold.api from a higher layer",
    ]
