"""One structural adapter, configured per family by a short declaration.

A layer is recognised by its modules: an attention block with q/k/v/o projections (separate,
fused ``[q; k; v]``, or interleaved per head), and an MLP with producers (gate/up or fc1, possibly
fused ``[gate; up]``) and a consumer (down or fc2), or a mixture of experts whose experts are
stacked 3D tensors (plus an optional shared expert). A family declares only the module names,
the fused layouts and its config field names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch.nn as nn

from .base import Adapter, AttnSpec, MLPSpec
from .refs import Conv1DRef, ExpertRef, Fused, Ref, Stacked, get

# Width multiples the runtimes need, by MLP kind (MLPSpec.kind). transformers runs stacked experts with
# grouped/batched matmul kernels (torch grouped_mm) that want 16-byte aligned rows: a multiple of 8
# covers fp32, bf16 and fp16 (an expert width of 123 raises "strides should be multiple of 16 bytes").
# Dense MLPs and attention run as plain Linear layers at any width.
RUNTIME_ALIGN: dict[str, int] = {"experts": 8}

# attributes of an attention module that hold head counts or their products (set when present)
_Q_ATTRS = ("num_heads", "num_attention_heads", "n_heads")
_KV_ATTRS = ("num_key_value_heads",)
_WIDTH_ATTRS = ("all_head_size", "split_size")
_HEAD_DIM_ATTRS = ("head_dim", "attention_head_size", "head_size")


def _path(obj: object, dotted: str) -> object:
    for part in filter(None, dotted.split(".")):
        obj = getattr(obj, part)
    return obj


class _HeadsConfig:
    """The shared config with the head count of one layer (for forwards that read config.num_attention_heads)."""

    def __init__(self, base: object, num_attention_heads: int) -> None:
        self.__dict__.update(_base=base, num_attention_heads=num_attention_heads)

    def __getattr__(self, name: str) -> object:
        if name.startswith("__") or name == "_base":
            raise AttributeError(name)
        return getattr(self.__dict__["_base"], name)


@dataclass(frozen=True)
class Family:
    """Where one family keeps its projections (paths are relative to a layer)."""

    model_types: tuple[str, ...]
    layers: tuple[str, ...] = ("layers",)  # candidate paths of the layer list, under the base model
    mlp: str = "mlp"
    producers: tuple[str, ...] = ("gate_proj", "up_proj")
    consumer: str = "down_proj"
    fused_mlp: str | None = None  # one projection holding [gate; up] (Phi-3)
    attn: str = "self_attn"
    qkvo: tuple[str, str, str, str] = ("q_proj", "k_proj", "v_proj", "o_proj")
    attn_module: str = ""  # module (under attn) holding the head attributes (BERT: "self")
    fused_qkv: str | None = None  # one projection holding [q; k; v], or per-head interleaved
    interleaved_qkv: bool = False  # GPT-NeoX: [q_0 k_0 v_0 q_1 k_1 v_1 ...]
    conv1d: bool = False  # GPT-2: Conv1D (transposed weights)
    vanilla_heads: bool = True
    config_fields: dict[str, str | None] = field(default_factory=dict)
    heads_in_config: bool = False  # forward reads config.num_attention_heads (Phi-3)
    text_config: bool = False
    experts: str = "experts"  # MoE: stacked expert tensors gate_up_proj / down_proj under the MLP
    shared_expert: str = "shared_expert"
    expert_key: str = "intermediate_size"  # canonical size key of the experts' width
    dense_key: str = "intermediate_size"
    mlp_sum: str | None = None  # post-norm layers: the norm whose input is residual + MLP output
    mlp_feedback: bool = True  # is that sum linear in the MLP's output (see Adapter.mlp_sum)?
    fixed_heads: str | None = None  # why no layer's head count can change (attention targets refused)
    # kept widths at multiples of these, by MLP kind ("mlp", "experts", "shared_expert"); see RUNTIME_ALIGN
    align: dict[str, int] = field(default_factory=lambda: dict(RUNTIME_ALIGN))


class StructuredAdapter(Adapter):
    """The adapter for every declared family."""

    def __init__(self, fam: Family) -> None:
        self.fam = fam
        self.model_types = fam.model_types
        self.vanilla_heads = fam.vanilla_heads
        self.config_fields = fam.config_fields
        self.text_config = fam.text_config
        self.mlp_feedback = fam.mlp_feedback
        self.fixed_heads = fam.fixed_heads

    def __repr__(self) -> str:
        return f"StructuredAdapter({'/'.join(self.model_types)})"

    def _layer_path(self, model: nn.Module) -> str:
        base = model.base_model
        for p in self.fam.layers:
            try:
                obj = _path(base, p)
            except AttributeError:
                continue
            if isinstance(obj, nn.ModuleList):
                return p
        raise AttributeError(f"no layer list at {self.fam.layers} in {type(base).__name__}")

    def layers(self, model: nn.Module) -> list[nn.Module]:
        return list(_path(model.base_model, self._layer_path(model)))

    def mlp_sum(self, model: nn.Module, i: int) -> nn.Module | None:
        return None if self.fam.mlp_sum is None else _path(self.layers(model)[i], self.fam.mlp_sum)

    def _prefix(self, model: nn.Module, i: int) -> str:
        base = model.base_model_prefix if model.base_model is not model else ""
        return ".".join(filter(None, (base, self._layer_path(model), str(i))))

    def _ref(self, mod: nn.Module, dotted: str) -> Ref:
        parent, _, attr = dotted.rpartition(".")
        parent = _path(mod, parent)
        return Conv1DRef(parent, attr) if self.fam.conv1d else (parent, attr)

    def _dense(self, mod: nn.Module, name: str, key: str) -> MLPSpec:
        f = self.fam
        if f.fused_mlp:
            base = self._ref(mod, f.fused_mlp)
            n = get(base).out_features // 2
            fused = Fused(base, ["gate", "up"], [n, n])
            prods = [fused.part("gate"), fused.part("up")]
        else:
            prods = [self._ref(mod, p) for p in f.producers]
        kind = "shared_expert" if key == "shared_expert_intermediate_size" else "mlp"
        return MLPSpec(name, prods, self._ref(mod, f.consumer), owner=mod, size_key=key, kind=kind,
                       align=f.align.get(kind, 1))

    def mlps(self, model: nn.Module, i: int) -> list[MLPSpec]:
        f = self.fam
        layer = self.layers(model)[i]
        mod = _path(layer, f.mlp)
        name = ".".join(filter(None, (self._prefix(model, i), f.mlp)))
        experts = getattr(mod, f.experts, None)
        if experts is None or not isinstance(getattr(experts, "gate_up_proj", None), nn.Parameter):
            return [self._dense(mod, name, f.dense_key)]
        gu, dn = Stacked(experts, "gate_up_proj"), Stacked(experts, "down_proj")
        out = []
        for e in range(gu.n):
            n = get(ExpertRef(dn, e)).in_features
            fused = Fused(ExpertRef(gu, e), ["gate", "up"], [n, n])
            out.append(MLPSpec(f"{name}.{f.experts}.{e}", [fused.part("gate"), fused.part("up")], ExpertRef(dn, e),
                               owner=experts, size_key=f.expert_key, width_attrs=("intermediate_dim",),
                               kind="experts", align=f.align.get("experts", 1)))
        shared = getattr(mod, f.shared_expert, None)
        if shared is not None:
            out.append(self._dense(shared, f"{name}.{f.shared_expert}", "shared_expert_intermediate_size"))
        return out

    def attention(self, model: nn.Module, i: int) -> AttnSpec:
        f = self.fam
        attn = _path(self.layers(model)[i], f.attn)
        heads = _path(attn, f.attn_module)
        hd = next(int(getattr(heads, a)) for a in _HEAD_DIM_ATTRS if getattr(heads, a, None))
        name = f"{self._prefix(model, i)}.{f.attn}"
        if f.fused_qkv:
            base = self._ref(attn, f.fused_qkv)
            rows = get(base).out_features
            if f.interleaved_qkv:
                fused = Fused(base, ["q", "k", "v"], [hd, hd, hd], interleave=True)
            else:
                hkv = int(getattr(heads, "num_key_value_heads", 0)) or rows // (3 * hd)
                fused = Fused(base, ["q", "k", "v"], [rows - 2 * hkv * hd, hkv * hd, hkv * hd])
            q, k, v = fused.part("q"), fused.part("k"), fused.part("v")
            names = [q.name, k.name, v.name, f.qkvo[3]]
        else:
            q, k, v = (self._ref(attn, n) for n in f.qkvo[:3])
            names = list(f.qkvo)
        o = self._ref(attn, f.qkvo[3])
        hq, hkv = get(q).out_features // hd, get(k).out_features // hd
        return AttnSpec(name, q, k, v, o, heads, hq, hkv, hd, names=names)

    def set_heads(self, spec: AttnSpec, num_heads: int, num_kv_heads: int) -> None:
        m = spec.module
        for attrs, val in ((_Q_ATTRS, num_heads), (_KV_ATTRS, num_kv_heads),
                           (_WIDTH_ATTRS, num_heads * spec.head_dim),
                           (("num_key_value_groups",), num_heads // num_kv_heads)):
            for a in attrs:
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, val)
        if self.fam.heads_in_config:
            cfg = m.config.__dict__["_base"] if isinstance(m.config, _HeadsConfig) else m.config
            m.config = cfg if cfg.num_attention_heads == num_heads else _HeadsConfig(cfg, num_heads)
