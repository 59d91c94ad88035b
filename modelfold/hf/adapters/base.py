"""What an adapter tells the folding code about one transformer layer (no tracing)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

Ref = tuple[nn.Module, str]  # (parent module, attribute name) of an nn.Linear


def get(ref: Ref) -> nn.Linear:
    return getattr(ref[0], ref[1])


def put(ref: Ref, module: nn.Linear) -> None:
    setattr(ref[0], ref[1], module)


def linear_like(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly ``weight`` (out, in) and ``bias``."""
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=weight.requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=bias.requires_grad)
    return lin


def resized(lin: nn.Linear, out_features: int | None = None, in_features: int | None = None) -> nn.Linear:
    """An uninitialised nn.Linear like ``lin`` with new sizes (filled by a state-dict load)."""
    out_f = lin.out_features if out_features is None else out_features
    in_f = lin.in_features if in_features is None else in_features
    w = torch.empty(out_f, in_f, dtype=lin.weight.dtype, device=lin.weight.device)
    b = None if lin.bias is None else torch.empty(out_f, dtype=lin.bias.dtype, device=lin.bias.device)
    return linear_like(w, b)


@dataclass
class MLPSpec:
    """Intermediate neurons: rows of ``producers`` (gate/up or fc1), columns of ``consumer``."""

    name: str
    producers: list[Ref]
    consumer: Ref
    owner: nn.Module | None = None  # module whose ``intermediate_size`` attribute is updated

    @property
    def width(self) -> int:
        return get(self.consumer).in_features

    def member_names(self) -> list[str]:
        return [f"{self.name}.{r[1]}" for r in self.producers] + [f"{self.name}.{self.consumer[1]}"]


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


class Adapter:
    """Per-family knowledge: where layers, MLPs and attention blocks live, which attributes to update."""

    model_types: tuple[str, ...] = ()
    vanilla_heads = True  # can a uniform head fold be expressed in the family's own config?

    def layers(self, model: nn.Module) -> list[nn.Module]:
        raise NotImplementedError

    def mlp(self, model: nn.Module, i: int) -> MLPSpec:
        raise NotImplementedError

    def attention(self, model: nn.Module, i: int) -> AttnSpec:
        raise NotImplementedError

    def set_heads(self, spec: AttnSpec, num_heads: int, num_kv_heads: int) -> None:
        """Update the attention module's attributes after its projections were resized."""
        raise NotImplementedError

    def set_uniform_config(self, config: object, sizes: dict[str, int]) -> None:
        """Write uniform per-layer sizes into the family's own config fields."""
        raise NotImplementedError

    def sizes(self, model: nn.Module, i: int) -> dict[str, int]:
        """Current intermediate width and head counts of layer ``i``."""
        a = self.attention(model, i)
        return {"intermediate_size": self.mlp(model, i).width, "num_attention_heads": a.num_heads,
                "num_key_value_heads": a.num_kv_heads}

    def resize(self, model: nn.Module, i: int, sizes: dict[str, int]) -> None:
        """Give layer ``i`` empty projections of the recorded sizes (before loading its weights)."""
        m = self.mlp(model, i)
        n = int(sizes["intermediate_size"])
        for ref in m.producers:
            put(ref, resized(get(ref), out_features=n))
        put(m.consumer, resized(get(m.consumer), in_features=n))
        if m.owner is not None and hasattr(m.owner, "intermediate_size"):
            m.owner.intermediate_size = n
        a = self.attention(model, i)
        hq, hkv = int(sizes["num_attention_heads"]), int(sizes["num_key_value_heads"])
        put(a.q, resized(get(a.q), out_features=hq * a.head_dim))
        put(a.k, resized(get(a.k), out_features=hkv * a.head_dim))
        put(a.v, resized(get(a.v), out_features=hkv * a.head_dim))
        put(a.o, resized(get(a.o), in_features=hq * a.head_dim))
        self.set_heads(a, hq, hkv)
