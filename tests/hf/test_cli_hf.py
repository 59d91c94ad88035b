"""The CLI folds a Hugging Face model directory into a reloadable directory."""

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
