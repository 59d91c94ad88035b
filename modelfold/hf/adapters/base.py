"""What an adapter tells the folding code about one transformer layer (no tracing)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch.nn as nn

from ...checks import kept_width
from .refs import Ref, get, put, ref_name, resized


def width_multiple(round_to: int | None, align: int = 1) -> int | None:
    """The multiple kept widths must have: the user's ``round_to`` combined with a runtime's ``align``
    (their least common multiple, so both hold), or None when neither constrains anything."""
    m = math.lcm(round_to or 1, align or 1)
    return m if m > 1 else None


@dataclass
class MLPSpec:
    """Intermediate neurons: rows of ``producers`` (gate/up or fc1), columns of ``consumer``."""

    name: str
    producers: list[Ref]
    consumer: Ref
    owner: nn.Module | None = None  # module whose ``width_attrs`` attributes are updated
    size_key: str = "intermediate_size"  # key of this MLP's width in Adapter.sizes()
    width_attrs: tuple[str, ...] = ("intermediate_size",)
    kind: str = "mlp"  # "mlp", "experts" (one expert of a stacked expert tensor) or "shared_expert"
    align: int = 1  # the runtime needs kept widths at multiples of it (Family.align; experts: 8)

    @property
    def width(self) -> int:
        return get(self.consumer).in_features

    def kept(self, ratio: float, round_to: int | None = None) -> int:
        """Neurons kept at ``ratio``: ``checks.kept_width`` at multiples of ``round_to`` and of ``align``."""
        return kept_width(self.width, ratio, width_multiple(round_to, self.align))

    def member_names(self) -> list[str]:
        return [f"{self.name}.{ref_name(r)}" for r in self.producers] + [f"{self.name}.{ref_name(self.consumer)}"]


@dataclass
class AttnSpec:
    """Heads of one attention block: q/k/v rows (head_dim per head) and o columns."""

    name: str
    q: Ref
    k: Ref
    v: Ref
    o: Ref
    module: nn.Module  # attention module whose head attributes are updated
    num_heads: int
    num_kv_heads: int
    head_dim: int
    names: list[str] = field(default_factory=list)

    @property
    def n_rep(self) -> int:
        return self.num_heads // self.num_kv_heads


HEAD_KEYS = ("num_attention_heads", "num_key_value_heads")


class Adapter:
    """Per-family knowledge: where layers, MLPs and attention blocks live, which attributes to update.

    ``sizes()`` uses canonical keys ("intermediate_size", "moe_intermediate_size",
    "shared_expert_intermediate_size", "num_attention_heads", "num_key_value_heads");
    ``config_fields`` maps them to the family's own config attributes (None: not expressible).
    """

    model_types: tuple[str, ...] = ()
    vanilla_heads = True  # can a uniform head fold be expressed in the family's own config?
    config_fields: dict[str, str | None] = {}
    text_config = False  # sizes live in config.text_config (multimodal wrappers)
    mlp_feedback = True  # is residual + MLP output a linear sum at mlp_sum() (feedback refits need it)?
    fixed_heads: str | None = None  # why no layer's head count can change (None: heads fold and prune)

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def check_heads(self, ratio: object, targets: object) -> None:
        """Refuse a ratio/plan that would change head counts where the family cannot (``fixed_heads``),
        before anything is computed or written: an ``UnsupportedModelError`` naming the way out."""
        if not self.fixed_heads:
            return
        from ...errors import UnsupportedModelError
        from ..plan import parse_targets

        entries = ratio.values() if isinstance(ratio, Mapping) else [ratio]
        if any(v.get("attention") if isinstance(v, Mapping) else "attention" in parse_targets(targets)
               for v in entries):
            raise UnsupportedModelError(
                f"{'/'.join(self.model_types)}: attention heads cannot be removed or merged: {self.fixed_heads}. "
                "Compress the MLPs only: targets='mlp' (the default), or no 'attention' entries in a per-layer plan")

    def mlp_sum(self, model: nn.Module, i: int) -> nn.Module | None:
        """The module whose input is (residual + MLP output) when a norm follows the sum (post-LN
        layers), or None when that sum is the layer's output (pre-LN and parallel-residual layers)."""
        return None

    def mlps(self, model: nn.Module, i: int) -> list[MLPSpec]:
        """Every MLP of layer ``i``: one, or one per expert (and the shared expert) in MoE layers."""
        return [self.mlp(model, i)]

    def mlp(self, model: nn.Module, i: int) -> MLPSpec:
        return self.mlps(model, i)[0]

    def align(self, model: nn.Module) -> dict[str, int]:
        """Width multiples the runtime needs for ``model``'s tensors, by kind ({"experts": 8}; {} if none).

        Only kinds present in ``model`` are listed; the folding steps honour them through
        ``MLPSpec.kept`` (combined with the user's ``round_to``), and sizing counts with them.
        """
        out: dict[str, int] = {}
        for i in range(len(self.layers(model))):
            for m in self.mlps(model, i):
                if m.align > 1:
                    out[m.kind] = max(out.get(m.kind, 1), m.align)
        return out

    def attention(self, model: nn.Module, i: int) -> AttnSpec:
        raise NotImplementedError

    def set_heads(self, spec: AttnSpec, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's attributes after its projections were resized."""
        raise NotImplementedError

    def config_of(self, config: object) -> object:
        """The config object holding the layer sizes."""
        return getattr(config, "text_config", config) if self.text_config else config

    def field(self, key: str) -> str | None:
        return self.config_fields.get(key, key)

    def config_sizes(self, config: object) -> dict[str, int]:
        """Head counts as the family's config states them."""
        c = self.config_of(config)
        hq = getattr(c, self.field("num_attention_heads"))
        kv = self.field("num_key_value_heads")
        return {"num_attention_heads": hq, "num_key_value_heads": (getattr(c, kv, None) if kv else None) or hq}

    def set_uniform_config(self, config: object, sizes: dict[str, int]) -> None:
        """Write uniform per-layer sizes into the family's own config fields."""
        c = self.config_of(config)
        if self.vanilla_heads:  # keep head_dim explicit: it must not follow the head count
            c.head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        elif sizes["num_attention_heads"] != self.config_sizes(config)["num_attention_heads"]:
            raise ValueError(f"{type(self).__name__}: head folds cannot be expressed in the family's config")
        for key, val in sizes.items():
            f = self.field(key)
            if f is not None and (self.vanilla_heads or key not in HEAD_KEYS):
                setattr(c, f, val)

    def sizes(self, model: nn.Module, i: int) -> dict[str, int]:
        """Current MLP widths and head counts of layer ``i``."""
        a = self.attention(model, i)
        out = {m.size_key: m.width for m in self.mlps(model, i)}
        out.update({"num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads})
        return out

    def resize(self, model: nn.Module, i: int, sizes: dict[str, int]) -> None:
        """Give layer ``i`` empty projections of the recorded sizes (before loading its weights)."""
        for m in self.mlps(model, i):
            n = int(sizes[m.size_key])
            for ref in m.producers:
                put(ref, resized(get(ref), out_features=n))
            put(m.consumer, resized(get(m.consumer), in_features=n))
            for attr in m.width_attrs if m.owner is not None else ():
                if hasattr(m.owner, attr):
                    setattr(m.owner, attr, n)
        a = self.attention(model, i)
        hq, hkv = int(sizes["num_attention_heads"]), int(sizes["num_key_value_heads"])
        put(a.q, resized(get(a.q), out_features=hq * a.head_dim))
        put(a.k, resized(get(a.k), out_features=hkv * a.head_dim))
        put(a.v, resized(get(a.v), out_features=hkv * a.head_dim))
        put(a.o, resized(get(a.o), in_features=hq * a.head_dim))
        self.set_heads(a, hq, hkv)
