import pytest
import torch
from nets import MLP, ResNetish

import modelfold
from modelfold import errors


def _model():
    torch.manual_seed(0)
    return MLP(8).eval(), torch.randn(2, 12)


@pytest.mark.parametrize("ratio", [-0.1, 1.0, 1.5, float("nan")])
def test_bad_ratio(ratio: float) -> None:
    m, x = _model()
    with pytest.raises(errors.InvalidRatioError, match="ratio"):
        modelfold.fold(m, x, ratio=ratio)


def test_ratio_and_sparsity_exclusive() -> None:
    m, x = _model()
    with pytest.raises(errors.InvalidRatioError, match="exactly one"):
        modelfold.fold(m, x, ratio=0.5, sparsity=0.5)


def test_wrong_input_shape() -> None:
    m, _ = _model()
    with pytest.raises(errors.InputShapeError, match=r"tensor\(2, 7\)"):
        modelfold.fold(m, torch.randn(2, 7), ratio=0.5)


def test_training_mode_refused() -> None:
    m, x = _model()
    m.train()
    with pytest.raises(errors.ModelModeError, match="eval"):
        modelfold.fold(m, x, ratio=0.5)
    assert m.training  # the user's model is left as it was


def test_nan_weights_named() -> None:
    m, x = _model()
    with torch.no_grad():
        m.net[2].weight[0, 0] = float("nan")
    with pytest.raises(errors.InvalidWeightsError, match=r"net\.2\.weight"):
        modelfold.fold(m, x, ratio=0.5)


class Shuffle(torch.nn.Module):
    """A channel shuffle between two convs: the tracer takes the reshapes for identity."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 8, 1)
        self.b = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.a(x)
        n, c, h, w = y.shape
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.b(y)


def test_channel_shuffle_is_never_folded_silently() -> None:
    torch.manual_seed(0)
    m, x = Shuffle().eval(), torch.randn(1, 3, 4, 4)
    folded, report = modelfold.fold(m, x, ratio=0.5, return_report=True)
    assert folded.a.out_channels == 8  # kept intact
    assert any(g.status == "kept" for g in report.groups)
    with pytest.raises(errors.UnsupportedModelError, match="ignore="):
        modelfold.fold(m, x, ratio=0.5, strict=True)


def test_unknown_ignore_name() -> None:
    m, x = _model()
    with pytest.raises(ValueError, match="not a module"):
        modelfold.fold(m, x, ratio=0.5, ignore=["nope"])


def test_missing_example_inputs() -> None:
    with pytest.raises(TypeError, match="example_inputs"):
        modelfold.fold(ResNetish(4).eval(), ratio=0.5)


def test_corrupt_checkpoint(tmp_path) -> None:
    bad = tmp_path / "w.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(errors.CheckpointError, match="cannot read"):
        modelfold.io.load_model("resnet18", str(bad))


@pytest.mark.parametrize("bad", [0, -8, 2.5, True, "8"])
def test_bad_round_to(bad) -> None:
    m, x = _model()
    for fn in (modelfold.fold, modelfold.prune):
        with pytest.raises(errors.InvalidRatioError, match="round_to"):
            fn(m, x, ratio=0.5, round_to=bad)
