import subprocess
import sys

import pytest
import torch
from nets import ResNetish, randomize_bn

from modelfold.cli import main


def test_help_documents_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "modelfold.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for word in ("fold", "prune", "inspect", "MODEL", "package.module:factory"):
        assert word in out.stdout


def test_fold_saved_model_roundtrip(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    src = tmp_path / "model.pt"
    torch.save(model, src)
    out = tmp_path / "folded.pt"
    code = main(["fold", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16", "--out", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "parameters" in text and "MACs" in text and "saved to" in text
    folded = torch.load(out, weights_only=False)
    assert folded.stem[0].out_channels == 4
    assert folded(torch.randn(1, 3, 16, 16)).shape == (1, 5)


def test_bad_arguments_give_clear_errors(tmp_path, capsys) -> None:
    out = tmp_path / "x.pt"
    assert main(["fold", "no_such_model", "--ratio", "0.5", "--out", str(out)]) == 2
    assert "unknown model" in capsys.readouterr().err
    assert main(["fold", "resnet18", "--ratio", "1.5", "--out", str(out)]) == 2
    assert "outside [0, 1)" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit):
        main(["fold", "resnet18", "--out", str(out)])  # neither --ratio nor --sparsity


def test_existing_output_survives_failure(tmp_path) -> None:
    out = tmp_path / "keep.pt"
    out.write_bytes(b"precious")
    from modelfold.io import atomic_write

    def boom(path: str) -> None:
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(out, boom)
    assert out.read_bytes() == b"precious"
    assert list(tmp_path.iterdir()) == [out]


def test_inspect_lists_groups(capsys) -> None:
    assert main(["inspect", "resnet18", "--input-shape", "1,3,32,32"]) == 0
    text = capsys.readouterr().out
    assert "layer1.0.conv1" in text and "groups foldable" in text


def test_inspect_keep_outputs(capsys) -> None:
    assert main(["inspect", "resnet18", "--input-shape", "1,3,32,32", "--keep-outputs", "conv1"]) == 0
    lines = capsys.readouterr().out.splitlines()
    stem = next(line for line in lines if line.startswith("conv1 "))
    assert "kept: output channels kept" in stem
    assert "foldable" in next(line for line in lines if line.startswith("layer1.0.conv1 "))


def test_fold_repair_options(tmp_path, capsys, monkeypatch) -> None:
    """--ar-rho / --dir-batch / --dir-iters reach the repair; a mismatched option is refused."""
    monkeypatch.setenv("MODELFOLD_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    src = tmp_path / "model.pt"
    torch.save(model, src)
    base = ["fold", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16"]
    x = torch.randn(2, 3, 16, 16)
    outs = {}
    for rho in ("pooled", "producer"):
        out = tmp_path / f"{rho}.pt"
        assert main(base + ["--repair", "ar", "--ar-rho", rho, "--out", str(out)]) == 0
        outs[rho] = torch.load(out, weights_only=False)(x)
    assert not torch.allclose(outs["pooled"], outs["producer"])  # the option changed the γ factors
    out = tmp_path / "dir.pt"
    assert main(base + ["--repair", "dir", "--dir-batch", "4", "--dir-iters", "2", "--out", str(out)]) == 0
    assert list((tmp_path / "cache" / "dir").iterdir())  # a synthetic batch was made and cached
    capsys.readouterr()
    assert main(base + ["--repair", "none", "--ar-rho", "all", "--out", str(tmp_path / "x.pt")]) == 2
    assert "--ar-rho applies to --repair ar" in capsys.readouterr().err
    assert main(base + ["--repair", "ar", "--dir-iters", "3", "--out", str(tmp_path / "y.pt")]) == 2
    assert "--repair dir" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists() and not (tmp_path / "y.pt").exists()


def test_fold_r_from_the_command_line_matches_the_api(tmp_path, capsys) -> None:
    import numpy as np

    import modelfold

    torch.manual_seed(0)
    model = randomize_bn(ResNetish(8)).eval()
    src = tmp_path / "model.pt"
    torch.save(model, src)
    data = torch.randn(40, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    torch.save((data, torch.zeros(40, dtype=torch.long)), tmp_path / "data.pt")
    np.save(tmp_path / "data.npy", data.numpy())
    base = ["fold", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16", "--repair", "data"]
    expected = modelfold.fold(model, torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)),
                              ratio=0.5, repair="data", data=data)
    x = torch.randn(4, 3, 16, 16)
    for name in ("data.pt", "data.npy"):
        out = tmp_path / f"{name}.folded.pt"
        assert main([*base, "--data", str(tmp_path / name), "--out", str(out)]) == 0, capsys.readouterr().err
        got = torch.load(out, weights_only=False)
        assert torch.allclose(got(x), expected(x), atol=1e-6)
    assert main([*base, "--out", str(tmp_path / "o.pt")]) == 2
    assert "needs --data" in capsys.readouterr().err
    torch.save(torch.randn(5, 3, 8, 8), tmp_path / "small.pt")
    assert main([*base, "--data", str(tmp_path / "small.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "(3, 8, 8) per sample" in capsys.readouterr().err
    (tmp_path / "bad.pt").write_bytes(b"not a tensor file")
    assert main([*base, "--data", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "o.pt")]) == 2
    assert "cannot read data file" in capsys.readouterr().err
    assert main(["fold", str(src), "--ratio", "0.5", "--input-shape", "1,3,16,16", "--data", "fmnist",
                 "--out", str(tmp_path / "o.pt")]) == 2
    assert "--data applies to --repair data" in capsys.readouterr().err
    assert not (tmp_path / "o.pt").exists()


def test_round_to_from_the_command_line(tmp_path, capsys) -> None:
    torch.manual_seed(0)
    model = randomize_bn(ResNetish(24)).eval()
    src = tmp_path / "model.pt"
    torch.save(model, src)
    base = ["fold", str(src), "--input-shape", "1,3,16,16"]
    for cmd in (base + ["--ratio", "0.3"], ["prune", *base[1:], "--sparsity", "0.3"]):
        out = tmp_path / "r.pt"
        assert main([*cmd, "--round-to", "8", "--out", str(out)]) == 0, capsys.readouterr().err
        got = torch.load(out, weights_only=False)
        widths = [m.out_channels for m in got.modules() if isinstance(m, torch.nn.Conv2d)]
        assert all(w % 8 == 0 for w in widths) and min(widths) < 24
        assert got(torch.randn(1, 3, 16, 16)).shape == (1, 5)
    capsys.readouterr()
    assert main([*base, "--ratio", "0.3", "--round-to", "0", "--out", str(tmp_path / "bad.pt")]) == 2
    assert "round_to=0 must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "bad.pt").exists()


def test_no_verify_reaches_every_path(tmp_path, monkeypatch, capsys) -> None:
    """--no-verify turns the result checks off on the CNN, in-memory HF and layer-by-layer HF paths."""
    import modelfold.api as api
    import modelfold.hf.checkpoint.run as run

    seen = []

    def spy(real):
        def call(*a, **kw):
            seen.append(kw.get("verify", "missing"))
            return real(*a, **kw)
        return call

    monkeypatch.setattr(api, "fold", spy(api.fold))
    monkeypatch.setattr(run, "run_checkpoint", spy(run.run_checkpoint))
    torch.manual_seed(0)
    torch.save(randomize_bn(ResNetish(8)).eval(), tmp_path / "m.pt")
    pytest.importorskip("transformers")
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "hf"))
    from hf_models import make_model

    make_model("llama").save_pretrained(tmp_path / "llama")
    for verify in (True, False):
        flag = [] if verify else ["--no-verify"]
        assert main(["fold", str(tmp_path / "m.pt"), "--ratio", "0.5", "--input-shape", "1,3,16,16",
                     "--out", str(tmp_path / f"cnn{verify}.pt"), *flag]) == 0
        for stream in ("never", "always"):
            assert main(["fold", str(tmp_path / "llama"), "--ratio", "0.3", "--stream", stream,
                         "--out", str(tmp_path / f"{stream}{verify}"), *flag]) == 0, capsys.readouterr().err
    assert seen == [True, True, True, False, False, False]
