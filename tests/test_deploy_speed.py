"""benchmarks/deploy_speed.py's arithmetic: interleaved speed-ups against the original runs around each compressed
run, and the fixed + per-byte fit that explains a speed-up below the bytes reduction (no timing here)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
deploy_speed = pytest.importorskip("deploy_speed", reason="benchmarks/deploy_speed.py imports torch and modelfold")


def test_speedups_are_against_the_original_runs_around_each_run() -> None:
    # one repetition: O C1 O C2 O; the machine gets 2x slower half-way, and it cancels out
    secs = [(0, 1.0), (1, 0.5), (0, 1.0), (2, 1.6), (0, 2.0)]
    runs = [{"rep": 0, "pos": i, "model": m, "wall_s": s} for i, (m, s) in enumerate(secs)]
    r = deploy_speed.ratios(runs, key="wall_s")
    assert r[1] == [pytest.approx(2.0)]
    assert r[2] == [pytest.approx(2 ** 0.5 / 1.6)]


def test_fixed_cost_fit() -> None:
    wbytes = [100e6, 80e6, 60e6]
    sec = [(2.0 + 0.2 * b / 1e6) / 1e3 for b in wbytes]  # 2 ms fixed + 0.2 ms per MB
    fixed, per_mb = deploy_speed.fit_fixed(sec, wbytes)
    assert fixed == pytest.approx(2.0) and per_mb == pytest.approx(0.2)
