import pytest

from modelfold.calib.budget import allocate, ratio_grid
from modelfold.errors import InvalidRatioError


def _curve(sens, size=100.0):
    return [(r, r * size, sens * r * r) for r in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6)]


def test_fragile_unit_keeps_more_and_target_met():
    curves = {"robust": _curve(1.0), "fragile": _curve(50.0), "mid": _curve(5.0)}
    plan = allocate(curves, 90.0)
    assert sum(r * 100 for r in plan.values()) >= 90.0 - 1e-9
    assert plan["fragile"] < plan["mid"] < plan["robust"]


def test_equal_units_get_equal_ratios_and_zero_target_is_identity():
    curves = {f"u{i}": _curve(2.0) for i in range(4)}
    plan = allocate(curves, 120.0)
    assert len(set(plan.values())) == 1 and plan["u0"] == pytest.approx(0.3)
    assert set(allocate(curves, 0.0).values()) == {0.0}


def test_unreachable_target_is_refused():
    with pytest.raises(InvalidRatioError, match="at most"):
        allocate({"a": _curve(1.0)}, 1000.0)


def test_one_ratio_grid_gives_both_engines_their_candidates():
    from modelfold.hf.calib.sensitivity import RATIO_GRID
    from modelfold.traced.budget import CANDIDATES

    assert ratio_grid(0.05, 0.8) == RATIO_GRID == tuple(round(0.05 * i, 2) for i in range(17))
    assert CANDIDATES == (0.1, 0.2, 0.3, 0.4, 0.5, 0.7)
    assert ratio_grid(0.1, 0.3) == (0.0, 0.1, 0.2, 0.3)  # 3 * 0.1 rounded back to 0.3
