"""CLI: --calibration FILE for fold/prune and --merge neuron, equal to the API."""

import torch

import modelfold
from modelfold.cli import main
from tests.nets import VGGish, randomize_bn


def test_cli_calibration_file_matches_api(tmp_path, capsys):
    torch.manual_seed(0)
    model = randomize_bn(VGGish(4)).eval()
    src, data = tmp_path / "model.pt", tmp_path / "calib.pt"
    torch.save(model, src)
    x = torch.randn(16, 3, 16, 16)
    torch.save(x, data)
    out = tmp_path / "pruned.pt"
    assert main(["prune", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16", "--calibration", str(data),
                 "--out", str(out)]) == 0
    assert "calibration=data" in capsys.readouterr().out
    got = torch.load(out, weights_only=False)
    ref = modelfold.prune(model, torch.randn(1, 3, 16, 16), 0.5, calibration=x)
    with torch.no_grad():
        assert torch.equal(got(x), ref(x))


def test_cli_neuron_merging(tmp_path):
    model = randomize_bn(VGGish(4)).eval()
    src, out = tmp_path / "model.pt", tmp_path / "merged.pt"
    torch.save(model, src)
    assert main(["prune", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16", "--merge", "neuron",
                 "--out", str(out)]) == 0
    ref = modelfold.prune(model, torch.randn(1, 3, 16, 16), 0.5, merge="neuron")
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(torch.load(out, weights_only=False)(x), ref(x))
