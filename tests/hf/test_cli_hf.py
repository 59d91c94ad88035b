"""The CLI folds a Hugging Face model directory into a reloadable directory."""

import torch
from hf_models import inputs, make_model, out

import modelfold
from modelfold.cli import main


def test_cli_folds_hf_directory(tmp_path, capsys) -> None:
    model = make_model("llama")
    src, dst = tmp_path / "src", tmp_path / "dst"
    model.save_pretrained(src)
    code = main(["fold", str(src), "--ratio", "0.5", "--targets", "mlp", "--out", str(dst)])
    assert code == 0, capsys.readouterr().err
    assert "saved to" in capsys.readouterr().out
    folded = modelfold.hf.load_pretrained(dst)
    expected = modelfold.fold(model, ratio=0.5, targets="mlp")
    x = inputs()
    assert folded.config.intermediate_size == expected.config.intermediate_size < model.config.intermediate_size
    assert (out(folded, x) - out(expected, x)).abs().max() <= 1e-5


def test_cli_streams_safetensors_directories_by_default_with_the_in_memory_result(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    src = tmp_path / "src"
    make_model("qwen2").save_pretrained(src, max_shard_size="20KB")
    args = ["fold", str(src), "--ratio", "0.5", "--targets", "all"]
    assert main([*args, "--out", str(tmp_path / "mem"), "--stream", "never"]) == 0
    assert "layer by layer" not in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "st"), "--stream", "always", "--max-shard-size", "30KB"]) == 0
    assert "layer by layer" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "auto")]) == 0
    assert "layer by layer" in capsys.readouterr().out

    def tensors(d):
        sd = {}
        for f in sorted(d.glob("*.safetensors")):
            sd.update(load_file(str(f)))
        return sd

    mem = tensors(tmp_path / "mem")
    for d in ("st", "auto"):
        got = tensors(tmp_path / d)
        assert set(got) == set(mem) and all(torch.equal(got[k], mem[k]) for k in mem)
    assert len(list((tmp_path / "st").glob("*.safetensors"))) > 1


def test_cli_stream_always_refuses_a_non_directory_model(tmp_path, capsys) -> None:
    code = main(["fold", "resnet18", "--ratio", "0.5", "--stream", "always", "--out", str(tmp_path / "o")])
    assert code == 2
    assert "--stream always needs a transformers directory" in capsys.readouterr().err


def test_cli_sparsity_on_a_hf_directory_in_memory_and_streamed(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    make_model("llama").save_pretrained(src)
    orig = modelfold.hf.load_pretrained(src)
    n = sum(p.numel() for p in orig.parameters())
    ref = modelfold.hf.fold_model(make_model("llama"), ratio=0.25, targets="all")
    asked = round(1 - sum(p.numel() for p in ref.parameters()) / n, 4)  # reachable with one uniform ratio
    for mode in ("never", "always"):
        code = main(["fold", str(src), "--sparsity", str(asked), "--targets", "all", "--stream", mode,
                     "--out", str(tmp_path / mode)])
        assert code == 0, capsys.readouterr().err
        m = modelfold.hf.load_pretrained(tmp_path / mode)
        removed = 1 - sum(p.numel() for p in m.parameters()) / n
        assert abs(removed - asked) <= 0.01
    assert main(["prune", str(src), "--sparsity", "0.9", "--out", str(tmp_path / "x")]) == 2
    assert "not reachable" in capsys.readouterr().err


def test_cli_inspect_hf_directory_reports_what_sparsity_can_reach(tmp_path, capsys) -> None:
    import re

    import pytest

    from modelfold.errors import InvalidRatioError

    src = tmp_path / "src"
    model = make_model("mistral")
    model.save_pretrained(src)
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert text.count("MLP     48 neurons") == 3 and "4 query /   2 KV" in text
    shares = [float(v) for v in re.findall(r"(\d+\.\d)%", text.splitlines()[4])]
    assert sum(shares) == pytest.approx(100, abs=0.2)
    most = float(re.search(r"targets='mlp'\s+sparsity= reaches at most (\d+\.\d)%", text).group(1)) / 100
    modelfold.fold(model, sparsity=most - 0.001, targets="mlp")  # reachable, as reported
    with pytest.raises(InvalidRatioError, match="not reachable"):  # beyond the 0.01 tolerance
        modelfold.fold(model, sparsity=most + 0.02, targets="mlp")


def test_cli_skip_first_and_last_keep_those_layers(tmp_path, capsys) -> None:
    src = tmp_path / "src"
    model = make_model("llama", layers=4)
    model.save_pretrained(src)
    assert main(["fold", str(src), "--ratio", "0.5", "--skip-first", "1", "--skip-last", "2",
                 "--out", str(tmp_path / "o")]) == 0, capsys.readouterr().err
    sizes = [s["intermediate_size"] for s in modelfold.hf.load_pretrained(tmp_path / "o").config.modelfold_layers]
    assert sizes == [48, 24, 48, 48]
    assert main(["fold", "resnet18", "--ratio", "0.5", "--skip-first", "1", "--out", str(tmp_path / "c.pt")]) == 2
    assert "--skip-first/--skip-last apply to Hugging Face models" in capsys.readouterr().err


def test_cli_round_to_in_memory_and_layer_by_layer(tmp_path, capsys) -> None:
    from safetensors.torch import load_file

    model = make_model("qwen2", inter=100)
    src = tmp_path / "src"
    model.save_pretrained(src)
    expected = modelfold.prune(model, ratio=0.3, round_to=16).state_dict()
    for mode in ("never", "always"):
        dst = tmp_path / mode
        code = main(["prune", str(src), "--ratio", "0.3", "--round-to", "16", "--stream", mode, "--out", str(dst)])
        assert code == 0, capsys.readouterr().err
        got = load_file(str(dst / "model.safetensors"))
        assert got["model.layers.0.mlp.up_proj.weight"].shape[0] == 64  # 70 -> 64
        assert all(torch.equal(v, expected[k]) for k, v in got.items())
    capsys.readouterr()
    ids = tmp_path / "ids.pt"
    torch.save(torch.randint(3, 61, (4, 16), generator=torch.Generator().manual_seed(0)), ids)
    for mode in ("never", "always"):  # calibrated compression rounds too, the same in both paths
        dst = tmp_path / f"cal-{mode}"
        code = main(["compress", str(src), "--ratio", "0.3", "--round-to", "16", "--calibration", str(ids),
                     "--stream", mode, "--out", str(dst)])
        assert code == 0, capsys.readouterr().err
        assert load_file(str(dst / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"].shape[0] == 64
    capsys.readouterr()
    assert main(["fold", str(src), "--ratio", "0.3", "--round-to", "-8", "--out", str(tmp_path / "n")]) == 2
    assert "round_to=-8 must be a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "c").exists() and not (tmp_path / "n").exists()
