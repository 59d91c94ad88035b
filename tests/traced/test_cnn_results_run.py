"""Every CNN result runs before it is returned: a result that cannot run raises ResultError (issue 17, part 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from nets import ResNetish, VGGish, randomize_bn

import modelfold
from modelfold.errors import ModelFoldError, ResultError
from modelfold.runcheck import first_item


class WidthCheck(nn.Module):
    """A parameter-free module that assumes its input's channel count (invisible to the tracer and to the
    coupling check, which perturb values, not shapes)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] != self.channels:
            raise ValueError(f"expected {self.channels} channels, got {x.shape[1]}")
        return x


class Assumes16(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.chk = WidthCheck(16)
        self.c2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.c2(self.chk(torch.relu(self.c1(x)))).mean((2, 3)))


class BatchSeen(nn.Module):
    """Records the batch sizes of its inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(int(x.shape[0]))
        return x


def _assumes16() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    return Assumes16().eval(), torch.randn(4, 3, 8, 8)


def _state(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in m.state_dict().items()}


CALLS = {
    "fold": lambda m, x, **kw: modelfold.fold(m, x, 0.5, **kw),
    "prune": lambda m, x, **kw: modelfold.prune(m, x, 0.5, **kw),
    "compress": lambda m, x, **kw: modelfold.compress(m, x, 0.5, calibration=x, **kw),
}


@pytest.mark.parametrize("how", sorted(CALLS))
def test_result_that_cannot_run_is_refused(how: str) -> None:
    m, x = _assumes16()
    before = _state(m)
    modules = dict(m.named_modules())
    # calibrated compression runs the partly compressed model itself (traced.calibrator), where the module's own
    # error surfaces first; fold and prune meet it in the final check
    with pytest.raises(ValueError if how == "compress" else ResultError) as e:
        CALLS[how](m, x)
    msg = str(e.value)
    assert "expected 16 channels" in msg
    if how != "compress":
        assert "'chk'" in msg  # the failing module
        assert "keep_outputs=['c1']" in msg  # the way out: the layer feeding it
        assert isinstance(e.value, ModelFoldError)
    # the user's model is untouched: same weights, same module objects, same shapes
    assert dict(m.named_modules()) == modules
    after = m.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert m.c1.out_channels == 16 and not m.training
    m(x)


@pytest.mark.parametrize("how", sorted(CALLS))
def test_the_way_out_works(how: str) -> None:
    m, x = _assumes16()
    out = CALLS[how](m, x, keep_outputs=["c1"])
    assert out.c1.out_channels == 16 and out.c2.out_channels < 8  # c2's group still folds
    assert out(x).shape == (4, 4)


def test_verify_false_skips_the_check() -> None:
    m, x = _assumes16()
    out = modelfold.fold(m, x, 0.5, verify=False)  # returned unchecked ...
    with pytest.raises(ValueError, match="expected 16 channels"):  # ... and fails when used
        out(x)


def test_check_runs_on_the_first_item() -> None:
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3), BatchSeen()).eval()
    x = torch.randn(5, 3, 8, 8)
    out = modelfold.fold(m, x, 0.5)
    assert 1 in out[3].seen and set(out[3].seen) == {1, 5}  # the check ran on one item, the rest on the batch
    xs = (torch.randn(5, 3), {"a": torch.randn(5, 2), "b": torch.tensor(1.0)}, [torch.randn(1, 4)])
    first = first_item(xs)
    assert first[0].shape == (1, 3) and first[1]["a"].shape == (1, 2) and first[1]["b"].shape == ()
    assert first[2][0].shape == (1, 4)


@pytest.mark.parametrize(("net", "ratios"), [("vgg", (0.05, 0.13, 0.3, 0.37, 0.5, 0.62, 0.77, 0.9)),
                                             ("resnet", (0.13, 0.62))])
def test_foldable_cnns_pass_the_check(net: str, ratios: tuple[float, ...]) -> None:
    torch.manual_seed(0)
    m = randomize_bn(VGGish(6) if net == "vgg" else ResNetish(6)).eval()
    x = torch.randn(2, 3, 16, 16)
    for j, ratio in enumerate(ratios):  # prune at every ratio, fold (k-means, costlier) at every other one
        outs = [modelfold.prune(m, x, ratio)] + ([modelfold.fold(m, x, ratio, n_init=1)] if j % 2 == 0 else [])
        for out in outs:
            assert out(x).shape == m(x).shape
