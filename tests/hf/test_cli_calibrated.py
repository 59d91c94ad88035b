"""CLI calibrated compression: same model as the API, calibration sources, clean errors."""

import torch
from hf_models import make_model

import modelfold
from modelfold.cli import main


def _ids(n=4, length=16):
    return torch.randint(3, 61, (n, length), generator=torch.Generator().manual_seed(2))


def test_cli_compress_with_token_ids_matches_the_api(tmp_path, capsys) -> None:
    model = make_model("llama")
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    torch.save(_ids(), tmp_path / "ids.pt")
    code = main(["compress", str(src), "--sparsity", "0.2", "--targets", "all", "--calibration",
                 str(tmp_path / "ids.pt"), "--out", str(dst), "--stream", "never"])
    assert code == 0, capsys.readouterr().err
    code = main(["compress", str(src), "--sparsity", "0.2", "--targets", "all", "--calibration",
                 str(tmp_path / "ids.pt"), "--out", str(tmp_path / "streamed")])  # layer by layer (default)
    assert code == 0, capsys.readouterr().err
    a, b = modelfold.hf.load_pretrained(tmp_path / "streamed").state_dict(), modelfold.hf.load_pretrained(dst).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    got = modelfold.hf.load_pretrained(dst)
    # the same model as the CLI loads it (sdpa attention, not the test model's eager: activations differ in ulps)
    want = modelfold.compress(modelfold.hf.load_any(src), sparsity=0.2, targets="all", calibration=_ids())
    sg, sw = got.state_dict(), want.state_dict()
    assert all(torch.equal(sg[k], sw[k]) for k in sw)


def test_cli_prune_with_calibration_is_activation_aware(tmp_path, capsys) -> None:
    model = make_model("qwen2")
    src = tmp_path / "src"
    model.save_pretrained(src)
    torch.save(_ids(), tmp_path / "ids.pt")
    assert main(["prune", str(src), "--ratio", "0.5", "--calibration", str(tmp_path / "ids.pt"),
                 "--out", str(tmp_path / "a")]) == 0
    assert main(["prune", str(src), "--ratio", "0.5", "--out", str(tmp_path / "b")]) == 0
    a = modelfold.hf.load_pretrained(tmp_path / "a").model.layers[0].mlp.down_proj.weight
    b = modelfold.hf.load_pretrained(tmp_path / "b").model.layers[0].mlp.down_proj.weight
    assert a.shape == b.shape and not torch.equal(a, b)  # refit by least squares


def test_cli_calibration_errors(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    code = main(["compress", str(src), "--ratio", "0.3", "--calibration", str(tmp_path / "missing.pt"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "no such file" in capsys.readouterr().err
    (tmp_path / "text.txt").write_text("some words")
    code = main(["compress", str(src), "--ratio", "0.3", "--calibration", str(tmp_path / "text.txt"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "tokenizer" in capsys.readouterr().err
    code = main(["compress", "resnet18", "--ratio", "0.3", "--score", "wanda", "--out", str(tmp_path / "o.pt")])
    assert code == 2 and "Hugging Face" in capsys.readouterr().err  # CNNs compress too, with act/magnitude
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.pt").exists()


def test_cli_compensate_none_keeps_the_consumers_columns(tmp_path, capsys) -> None:
    """--compensate none: selection only, so every kept down_proj column is one of the original's, exactly;
    the default (ls) refits them; CNNs refuse --compensate bias by name."""
    model = make_model("llama")
    src = tmp_path / "src"
    model.save_pretrained(src)
    torch.save(_ids(), tmp_path / "ids.pt")
    for comp in ("none", "ls"):
        code = main(["compress", str(src), "--ratio", "0.5", "--calibration", str(tmp_path / "ids.pt"),
                     "--compensate", comp, "--lam", "0.001", "--out", str(tmp_path / comp)])
        assert code == 0, capsys.readouterr().err
    orig = model.model.layers[0].mlp.down_proj.weight
    for comp, same in (("none", True), ("ls", False)):
        w = modelfold.hf.load_pretrained(tmp_path / comp).model.layers[0].mlp.down_proj.weight
        assert w.shape[1] < orig.shape[1]
        assert all(any(torch.equal(c, o) for o in orig.T) for c in w.T) == same
    code = main(["compress", "resnet18", "--ratio", "0.3", "--compensate", "bias", "--out", str(tmp_path / "o.pt")])
    assert code == 2 and "CNNs take ls or none" in capsys.readouterr().err
