"""Broken or unsupported inputs end in a modelfold error naming the problem and the way out, via the
API and the CLI, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from hf_models import make_model

import modelfold
import modelfold.hf as mh
from modelfold.cli import main
from modelfold.errors import CheckpointError, UnsupportedModelError
from modelfold.hf.checkpoint import fold_checkpoint


def _bloom():
    import transformers

    cfg = transformers.BloomConfig(vocab_size=61, hidden_size=32, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("good") / "llama"
    make_model("llama", layers=2).save_pretrained(d)
    return d


def _variant(tmp_path: Path, good: Path, name: str, *, config: str | None = "keep", weights: bool = True) -> Path:
    d = tmp_path / name
    d.mkdir()
    if weights:
        shutil.copy(good / "model.safetensors", d)
    if config == "keep":
        shutil.copy(good / "config.json", d)
    elif config is not None:
        (d / "config.json").write_text(config)
    return d


def _cli_fails(args: list[str], capsys, *needles: str) -> str:
    capsys.readouterr()  # drop earlier output (save_pretrained progress bars)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("modelfold: error:") and "Traceback" not in err
    for n in needles:
        assert n in err, err
    return err


def test_unknown_family_is_named_with_the_supported_ones_and_no_image_inputs_hint():
    m = _bloom()
    assert mh.is_transformers(m) and not mh.is_supported(m)
    for call in (lambda: modelfold.fold(m, ratio=0.3), lambda: modelfold.prune(m, ratio=0.3),
                 lambda: modelfold.compress(m, ratio=0.3), lambda: mh.fold_model(m, ratio=0.3)):
        with pytest.raises(UnsupportedModelError) as e:
            call()
        msg = str(e.value)
        assert "model_type='bloom'" in msg and "llama" in msg and "gpt_neox" in msg and "mixtral" in msg
        assert "224" not in msg and "example_inputs" not in msg


def test_a_plain_module_without_inputs_still_points_to_the_traced_engine():
    with pytest.raises(TypeError, match="example_inputs is required"):
        modelfold.fold(torch.nn.Sequential(torch.nn.Linear(3, 4)).eval(), ratio=0.3)


def test_unknown_family_directory_cli_and_stream(tmp_path, capsys):
    src = tmp_path / "bloom"
    _bloom().save_pretrained(src)
    out = tmp_path / "out"
    for stream in ("never", "always"):
        _cli_fails(["fold", str(src), "--ratio", "0.3", "--stream", stream, "--out", str(out)], capsys,
                   "model_type='bloom'", "llama")
    _cli_fails(["inspect", str(src)], capsys, "model_type='bloom'")
    with pytest.raises(UnsupportedModelError, match="bloom"):
        fold_checkpoint(src, out, ratio=0.3, progress=False)
    assert not out.exists()


@pytest.mark.parametrize(("case", "needle"), [
    ("no_weights", "no weights"), ("no_config", "no config.json"), ("bad_json", "corrupt"),
    ("no_model_type", "no \"model_type\""), ("unknown_type", "does not know"),
])
def test_broken_directories(case, needle, tmp_path, good, capsys):
    cfg = json.loads((good / "config.json").read_text())
    kw = {"no_weights": dict(weights=False), "no_config": dict(config=None),
          "bad_json": dict(config=(good / "config.json").read_text()[:80]),
          "no_model_type": dict(config=json.dumps({k: v for k, v in cfg.items() if k != "model_type"})),
          "unknown_type": dict(config=json.dumps({**cfg, "model_type": "frobnicator"}))}[case]
    d = _variant(tmp_path, good, case, **kw)
    before = sorted(p.name for p in d.iterdir())
    out = tmp_path / "out"
    for stream in ("auto", "never", "always"):
        _cli_fails(["fold", str(d), "--ratio", "0.3", "--stream", stream, "--out", str(out)], capsys, needle, str(d))
    _cli_fails(["prune", str(d), "--ratio", "0.3", "--out", str(out)], capsys, needle)
    for call in (lambda: mh.load_pretrained(d), lambda: mh.load_any(d),
                 lambda: fold_checkpoint(d, out, ratio=0.3, progress=False)):
        with pytest.raises((CheckpointError, UnsupportedModelError), match=needle):
            call()
    assert not out.exists() and sorted(p.name for p in d.iterdir()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [case]  # no temporary directories left


def test_missing_tokenizer_is_a_clean_error(tmp_path, good):
    with pytest.raises(CheckpointError, match="no usable tokenizer.*tokenizer.json"):
        mh.load_tokenizer(good)
    with pytest.raises(CheckpointError, match="no tokenizer found"):
        mh.load_tokenizer(tmp_path / "nothing")


def _gguf(path: Path, arch: str) -> Path:
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_unknown_gguf_architecture(tmp_path, capsys):
    g = _gguf(tmp_path / "odd.gguf", "frobnicator")
    with pytest.raises(UnsupportedModelError, match="GGUF architecture 'frobnicator'.*llama"):
        mh.load_any(g)
    out = tmp_path / "out"
    _cli_fails(["fold", str(g), "--ratio", "0.3", "--out", str(out)], capsys, "'frobnicator'", "llama")
    _cli_fails(["inspect", str(g)], capsys, "'frobnicator'")
    (tmp_path / "junk.gguf").write_bytes(b"GGUF not really")
    _cli_fails(["fold", str(tmp_path / "junk.gguf"), "--ratio", "0.3", "--out", str(out)], capsys,
               "not a readable GGUF file")
    assert not out.exists()


def test_inspect_needs_only_the_config(tmp_path, capsys):
    d = tmp_path / "moe"
    make_model("qwen2_moe", layers=2).config.save_pretrained(d)  # config.json only, no weights
    capsys.readouterr()
    assert main(["inspect", str(d)]) == 0
    text = capsys.readouterr().out
    assert "x 4 experts + shared expert 48" in text and "heads   4 query /   2 KV" in text
