"""``modelfold eval`` on tiny saved models: the numbers equal the library's, side by side, clean errors."""

from __future__ import annotations

import json

import pytest
import torch
from test_eval_images import tiny_cnn
from tiny import byte_tokenizer, tiny_bert, tiny_llama

from modelfold.cli import main
from modelfold.evaluate import embedding_cosines, perplexity
from modelfold.evaluate.images import image_agreement, image_folder

TEXT = "Folding merges similar neurons; the next layer sums what it reads. " * 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    tok = byte_tokenizer()
    models = {"lm_a": tiny_llama(0), "lm_b": tiny_llama(1), "enc_a": tiny_bert(0), "enc_b": tiny_bert(1)}
    for name, m in models.items():
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    models["lm_a"].save_pretrained(root / "no_tok")
    (root / "text.txt").write_text(TEXT)
    return root, models, tok


def test_perplexity_side_by_side(saved, capsys) -> None:
    root, models, tok = saved
    args = ["eval", str(root / "lm_a"), "--compare", str(root / "lm_b"), "--text", str(root / "text.txt"),
            "--ctx", "16", "--windows", "3"]
    assert main(args + ["--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kind"] == "lm" and res["windows"] == 3 and res["predicted_tokens"] == 45
    for rec, key in zip(res["models"], ("lm_a", "lm_b"), strict=True):
        assert rec["perplexity"] == pytest.approx(perplexity(models[key], tok, TEXT, ctx=16, windows=3), rel=1e-6)
        assert rec["parameters"] == sum(p.numel() for p in models[key].parameters()) and rec["bos"]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "parameters" in table and "perplexity" in table and "lm_a" in table and "lm_b" in table
    assert f"{res['models'][1]['perplexity']:.4g}" in table


def test_encoder_cosine(saved, capsys) -> None:
    root, models, tok = saved
    (root / "sents.txt").write_text("one sentence here\n\nand another, longer sentence\n")
    assert main(["eval", str(root / "enc_a"), "--compare", str(root / "enc_b"), "--sentences",
                 str(root / "sents.txt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    cos = embedding_cosines(models["enc_a"], models["enc_b"], tok, ["one sentence here",
                                                                    "and another, longer sentence"])
    assert res["sentences"] == 2 and res["cosine_mean"] == pytest.approx(float(cos.mean()), rel=1e-5)


def test_image_model_side_by_side(tmp_path, capsys) -> None:
    from PIL import Image

    for i in range(4):
        arr = torch.randint(0, 256, (48, 48, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8)
        Image.fromarray(arr.numpy()).save(tmp_path / f"img_{i % 4}.png")
    a, b = tiny_cnn(0), tiny_cnn(1)
    torch.save(a, tmp_path / "a.pt")
    torch.save(b, tmp_path / "b.pt")
    assert main(["eval", str(tmp_path / "a.pt"), "--compare", str(tmp_path / "b.pt"), "--images", str(tmp_path),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    x, y = image_folder(tmp_path)
    ref = image_agreement(a, b, x, y)
    assert res["n"] == 4 and res["agreement"] == ref["agreement"] and res["models"][0]["top1"] == ref["top1_a"]
    assert res["kl"] == pytest.approx(ref["kl"])


def test_errors(saved, tmp_path, capsys) -> None:
    root, _, _ = saved
    cases = [
        (["eval", str(root / "lm_a"), "--text", str(tmp_path / "missing.txt")], "does not exist"),
        (["eval", str(root / "enc_a")], "pass --compare ORIGINAL"),
        (["eval", str(root / "lm_a"), "--compare", str(root / "enc_a")], "compare a folded model with its own"),
        (["eval", str(tmp_path / "no_model")], "unknown model"),
        (["eval", str(root / "lm_a"), "--ctx", "4096"], "exceeds the context length"),
        (["eval", str(root / "no_tok"), "--text", str(root / "text.txt"), "--ctx", "16"], "pass --tokenizer DIR"),
    ]
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\xfa")
    cases.append((["eval", str(root / "lm_a"), "--text", str(tmp_path / "bad.txt")], "not UTF-8"))
    for argv, message in cases:
        assert main(argv) == 2, argv
        assert message in capsys.readouterr().err, argv
