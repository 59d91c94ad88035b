"""Layer-by-layer folding of checkpoint directories: same result as in memory, safe with bad input."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from hf_models import FAMILIES, inputs, make_model, out
from safetensors.torch import load_file

import modelfold.hf as mh
from modelfold.errors import CheckpointError, InvalidRatioError
from modelfold.hf.checkpoint import ShardWriter, fold_checkpoint, parse_size, prune_checkpoint


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _digest(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.iterdir()) if p.is_file()}


def _checkpoint(tmp_path: Path, family: str = "llama", shard: str = "20KB", **kw) -> Path:
    src = tmp_path / "src"
    make_model(family, **kw).save_pretrained(src, max_shard_size=shard)
    return src


def _same_checkpoint(a: Path, b: Path, subset: bool = False) -> None:
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) <= set(tb) if subset else set(ta) == set(tb)
    for k in ta:
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k


@pytest.mark.parametrize("family", FAMILIES)
def test_stream_fold_is_bit_identical_to_in_memory_fold(family, tmp_path):
    src = _checkpoint(tmp_path, family)
    targets = "mlp" if family == "bert" else "all"
    before = _digest(src)
    ref = mh.fold_model(mh.load_pretrained(src), ratio=0.4, targets=targets, repair="none")
    mh.save(ref, tmp_path / "ref")
    report = fold_checkpoint(src, tmp_path / "st", ratio=0.4, targets=targets, max_shard_size="30KB",
                             progress=False)
    # the in-memory path also saves weights transformers initialised on load (BERT's unused pooler);
    # the streamed checkpoint holds exactly the input's tensor names
    assert set(_tensors(tmp_path / "st")) == set(_tensors(src))
    _same_checkpoint(tmp_path / "st", tmp_path / "ref", subset=True)
    x = inputs()
    assert torch.equal(out(mh.load_pretrained(tmp_path / "st"), x), out(ref, x))
    assert report.params_after < report.params_before
    assert report.params_after == sum(t.numel() for t in _tensors(tmp_path / "st").values())
    assert [g.channels_after for g in report.groups] == [g.channels_after for g in
                                                        mh.fold_model(mh.load_pretrained(src), ratio=0.4,
                                                                      targets=targets, return_report=True)[1].groups]
    assert _digest(src) == before  # the input checkpoint is never modified


def test_stream_output_is_sharded_indexed_and_loads_with_vanilla_transformers(tmp_path):
    import transformers

    src = _checkpoint(tmp_path)
    fold_checkpoint(src, tmp_path / "st", ratio=0.5, targets="all", max_shard_size="20KB", progress=False)
    st = tmp_path / "st"
    index = json.loads((st / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in st.glob("*.safetensors"))
    assert len(files) > 1 and sorted(set(index["weight_map"].values())) == files
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in _tensors(st).values())
    for f in files:  # a shard exceeds the limit only when it holds a single larger tensor
        sd = load_file(str(st / f))
        assert len(sd) == 1 or sum(t.numel() * t.element_size() for t in sd.values()) <= 20_000
    assert (st / "generation_config.json").is_file()
    vanilla = transformers.LlamaForCausalLM.from_pretrained(st).eval()
    assert vanilla.config.intermediate_size == 24 and vanilla.config.num_attention_heads == 2
    assert torch.equal(out(vanilla, inputs()), out(mh.load_pretrained(st), inputs()))


def test_stream_single_file_checkpoint_and_bf16_kept(tmp_path):
    src = tmp_path / "src"
    make_model("qwen2").to(torch.bfloat16).save_pretrained(src)
    assert (src / "model.safetensors").is_file()
    fold_checkpoint(src, tmp_path / "st", ratio=0.5, progress=False)
    ref = mh.fold_model(mh.load_pretrained(src, dtype=torch.bfloat16), ratio=0.5)
    mh.save(ref, tmp_path / "ref")
    _same_checkpoint(tmp_path / "st", tmp_path / "ref")
    assert (tmp_path / "st" / "model.safetensors").is_file()
    assert all(t.dtype == torch.bfloat16 for t in _tensors(tmp_path / "st").values())


def test_stream_per_layer_plan_and_refolding_a_nonuniform_checkpoint(tmp_path):
    src = _checkpoint(tmp_path, "mistral")
    plan = {0: 0.25, 2: {"mlp": 0.5, "attention": 0.5}}
    fold_checkpoint(src, tmp_path / "a", ratio=plan, progress=False)
    ref = mh.fold_model(mh.load_pretrained(src), ratio=plan)
    x = inputs()
    a = mh.load_pretrained(tmp_path / "a")
    assert a.config.modelfold_layers[2] != a.config.modelfold_layers[1]
    assert torch.equal(out(a, x), out(ref, x))
    # the folded (non-uniform) checkpoint is itself streamed again: its recorded sizes are honoured
    fold_checkpoint(tmp_path / "a", tmp_path / "b", ratio=0.3, skip_last=1, progress=False)
    ref2 = mh.fold_model(a, ratio=0.3, skip_last=1)
    assert torch.equal(out(mh.load_pretrained(tmp_path / "b"), x), out(ref2, x))


def test_stream_ratio_zero_copies_the_weights_exactly(tmp_path):
    src = _checkpoint(tmp_path, "qwen2")
    report = fold_checkpoint(src, tmp_path / "st", ratio=0.0, targets="all", progress=False)
    _same_checkpoint(tmp_path / "st", src)
    assert report.params_after == report.params_before


def test_stream_prune_matches_in_memory_prune(tmp_path):
    src = _checkpoint(tmp_path)
    prune_checkpoint(src, tmp_path / "st", ratio=0.5, norm=1, targets="all", progress=False)
    mh.save(mh.prune_model(mh.load_pretrained(src), ratio=0.5, norm=1, targets="all"), tmp_path / "ref")
    _same_checkpoint(tmp_path / "st", tmp_path / "ref")


def test_stream_refuses_output_inside_input_and_bad_arguments(tmp_path):
    src = _checkpoint(tmp_path)
    before = _digest(src)
    for dst in (src, src / "sub"):
        with pytest.raises(CheckpointError, match="outside the input"):
            fold_checkpoint(src, dst, ratio=0.3, progress=False)
    with pytest.raises(InvalidRatioError):
        fold_checkpoint(src, tmp_path / "o", ratio=1.0, progress=False)
    with pytest.raises(ValueError, match="max_shard_size"):
        fold_checkpoint(src, tmp_path / "o", ratio=0.3, max_shard_size="lots", progress=False)
    with pytest.raises(CheckpointError, match="no config.json"):
        fold_checkpoint(tmp_path / "nowhere", tmp_path / "o", ratio=0.3, progress=False)
    assert _digest(src) == before and not (tmp_path / "o").exists()


def test_stream_corrupt_or_incomplete_checkpoints_fail_cleanly_and_keep_old_output(tmp_path):
    src = _checkpoint(tmp_path)
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "config.json").write_text("{}")  # a previous output: replaced only by a complete new one
    (dst / "keep.txt").write_text("previous result")
    shards = sorted(src.glob("model-*.safetensors"))
    last = shards[-1]
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # truncated shard
    with pytest.raises(CheckpointError, match="corrupt"):
        fold_checkpoint(src, dst, ratio=0.3, progress=False)
    last.unlink()  # missing shard
    with pytest.raises(CheckpointError, match="missing"):
        fold_checkpoint(src, dst, ratio=0.3, progress=False)
    assert (dst / "keep.txt").read_text() == "previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directories left


def test_stream_refuses_non_safetensors_and_mismatched_config(tmp_path):
    src = _checkpoint(tmp_path, shard="10MB")
    (src / "model.safetensors").rename(src / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="no safetensors weights.*pytorch_model.bin"):
        fold_checkpoint(src, tmp_path / "o", ratio=0.3, progress=False)
    other = _checkpoint(tmp_path / "x", inter=40)  # weights of intermediate size 40, config says 48
    cfg = json.loads((other / "config.json").read_text())
    cfg["intermediate_size"] = 48
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="size mismatch|do not match"):
        fold_checkpoint(other, tmp_path / "o", ratio=0.3, progress=False)
    assert not (tmp_path / "o").exists()


def test_shard_writer_single_shard_is_named_like_transformers(tmp_path):
    w = ShardWriter(tmp_path, parse_size("1GB"))
    w.add("a", torch.ones(3))
    w.add("b", torch.zeros(2, 2))
    w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    assert set(load_file(str(tmp_path / "model.safetensors"))) == {"a", "b"}


def test_shard_writer_round_trips_dtypes_through_safetensors(tmp_path):
    g = torch.Generator().manual_seed(0)
    ts = {"bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16), "f16": torch.randn(7, generator=g).half(),
          "f32": torch.randn(2, 2, 2, generator=g), "i64": torch.arange(5), "bool": torch.tensor([True, False]),
          "empty": torch.zeros(0, 4), "strided": torch.randn(4, 6, generator=g).T}
    w = ShardWriter(tmp_path, 40)
    for k, v in ts.items():
        w.add(k, v)
    w.close()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2 and not list(tmp_path.glob(".body-*"))
    got = _tensors(tmp_path)
    assert set(got) == set(ts)
    for k, v in ts.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k


@pytest.mark.parametrize("where", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_stream_refuses_nan_weights_naming_the_tensor(tmp_path, where):
    from safetensors.torch import save_file

    src = _checkpoint(tmp_path, shard="10MB")
    sd = load_file(str(src / "model.safetensors"))
    sd[where][0, 0] = float("nan")
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    from modelfold.errors import InvalidWeightsError

    with pytest.raises(InvalidWeightsError, match=f"'{where}'.*NaN"):
        fold_checkpoint(src, tmp_path / "o", ratio=0.3, progress=False)
    assert not (tmp_path / "o").exists()


def test_stream_fold_ar_matches_in_memory(tmp_path):
    src = _checkpoint(tmp_path, "bert")
    fold_checkpoint(src, tmp_path / "st", ratio=0.5, repair="ar", progress=False)
    mh.save(mh.fold_model(mh.load_pretrained(src), ratio=0.5, repair="ar"), tmp_path / "ref")
    plain = tmp_path / "plain"
    fold_checkpoint(src, plain, ratio=0.5, progress=False)
    _same_checkpoint(tmp_path / "st", tmp_path / "ref", subset=True)
    ar, naive = _tensors(tmp_path / "st"), _tensors(plain)
    assert any(not torch.equal(ar[k], naive[k]) for k in ar)  # the repair did act


def test_stream_equals_in_memory_for_random_plans_and_shard_sizes(tmp_path_factory):
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    ratios = st.sampled_from([0.0, 0.2, 0.5, 0.75])
    layer_plan = st.fixed_dictionaries({}, optional={"mlp": ratios, "attention": ratios})
    plans = st.dictionaries(st.integers(0, 2), layer_plan, min_size=1, max_size=3)

    @settings(max_examples=8, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(family=st.sampled_from(["llama", "qwen2", "mistral"]), plan=plans,
           shard=st.integers(3_000, 60_000), seed=st.integers(0, 3))
    def check(family, plan, shard, seed):
        tmp = tmp_path_factory.mktemp("prop")
        make_model(family, seed=seed).save_pretrained(tmp / "src", max_shard_size=f"{shard // 1000 + 1}KB")
        plan = {i: p for i, p in plan.items() if p} or {0: 0.5}
        fold_checkpoint(tmp / "src", tmp / "st", ratio=plan, seed=seed, max_shard_size=shard, progress=False)
        mh.save(mh.fold_model(mh.load_pretrained(tmp / "src"), ratio=plan, seed=seed), tmp / "ref")
        _same_checkpoint(tmp / "st", tmp / "ref")
        for f in (tmp / "st").glob("*.safetensors"):
            sd = load_file(str(f))
            assert len(sd) == 1 or sum(t.numel() * t.element_size() for t in sd.values()) <= shard

    check()


def test_stream_refuses_to_replace_a_directory_that_is_not_a_model(tmp_path):
    src = _checkpoint(tmp_path)
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="does not hold a model"):
        fold_checkpoint(src, notes, ratio=0.3, progress=False)
    assert (notes / "todo.txt").read_text() == "mine"
    (tmp_path / "empty").mkdir()  # an empty directory is fine
    fold_checkpoint(src, tmp_path / "empty", ratio=0.3, progress=False)
    assert (tmp_path / "empty" / "config.json").is_file()


def test_stream_round_to_matches_in_memory(tmp_path):
    src = _checkpoint(tmp_path, inter=100)
    for name, stream, memory in (("fold", fold_checkpoint, mh.fold_model), ("prune", prune_checkpoint, mh.prune_model)):
        report = stream(src, tmp_path / name, ratio=0.3, targets="all", round_to=16, progress=False)
        ref = memory(mh.load_pretrained(src), ratio=0.3, targets="all", round_to=16)
        mh.save(ref, tmp_path / f"{name}-ref")
        _same_checkpoint(tmp_path / name, tmp_path / f"{name}-ref")
        assert report.info["round_to"] == 16
        assert _tensors(tmp_path / name)["model.layers.0.mlp.up_proj.weight"].shape[0] == 64
    with pytest.raises(InvalidRatioError, match="round_to"):
        fold_checkpoint(src, tmp_path / "bad", ratio=0.3, round_to=0, progress=False)
    assert not (tmp_path / "bad").exists()


def test_a_layer_that_cannot_run_is_never_written(tmp_path, monkeypatch):
    import torch.nn as nn

    import modelfold.hf.checkpoint.layers as layers
    from modelfold.errors import ResultError
    from modelfold.hf.checkpoint.resume import partial_path

    src = _checkpoint(tmp_path)
    fold = layers.fold_layer_fn

    def breaking(**kw):
        inner = fold(**kw)

        def layer(work, adapter, i, p):
            out = inner(work, adapter, i, p)
            if i == 1:  # a width the next projection does not read: the layer's forward fails
                mlp = adapter.layers(work)[i].mlp
                mlp.down_proj = nn.Linear(mlp.down_proj.in_features + 1, mlp.down_proj.out_features, bias=False)
            return out
        return layer

    monkeypatch.setattr(layers, "fold_layer_fn", breaking)
    with pytest.raises(ResultError, match=r"layers\.1"):
        fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]
    fold_checkpoint(src, tmp_path / "out", ratio=0.3, progress=False, verify=False)  # the check is what refused it
    assert (tmp_path / "out" / "config.json").is_file() and not partial_path(tmp_path / "out").exists()
