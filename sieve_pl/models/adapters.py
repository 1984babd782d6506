"""Architecture adapters: which Linears are pruned and which of them share an input.

This is the only place that knows about model families; everything else asks an adapter. (Whether
a target is an nn.Linear or a transposed Conv1D is a property of the module: ``factored.py``
answers it, because exported folders need it too.)
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import SieveError


@dataclass(frozen=True)
class Adapter:
    """Where the decoder layers are and, per layer, the target Linears grouped by shared input.

    Linears in one group read the same activation (q/k/v, gate/up), so calibration stores that
    input's second moment once per group.
    """

    name: str
    model_types: tuple[str, ...]
    layers: str
    groups: dict[str, tuple[str, ...]]
    # the MLP's inner dimension: (Linears whose rows are its neurons, the Linear whose columns
    # are, how many times each neuron appears in each of the first: 2 for a fused gate_up)
    mlp: tuple[tuple[str, ...], str, int] | None = None
    # the attention's value dimension: (v Linear, o Linear), separate Linears whose rows / columns
    # are head-major; None where v is fused with q/k (Phi-3, GPT-2): v and o are then factored
    heads: tuple[str, str] | None = None
    # the config.json key (dotted into sub-configs) of the MLP's inner dimension: an export
    # states there the widest MLP it holds
    mlp_size: str = "intermediate_size"

    def input_groups(self, model: nn.Module) -> dict[str, list[str]]:
        """``{input key: [full Linear names]}`` for every layer, in forward order."""
        layers = model.get_submodule(self.layers)
        return {f"{self.layers}.{i}.{group}": [f"{self.layers}.{i}.{lin}" for lin in linears]
                for i in range(len(layers)) for group, linears in self.groups.items()}

    def mlps(self, model: nn.Module) -> dict[str, tuple[tuple[str, ...], str, int]]:
        """``{MLP name: (neuron-row Linears, neuron-column Linear, blocks)}`` per layer."""
        if self.mlp is None:
            return {}
        inputs, output, blocks = self.mlp
        layers = len(model.get_submodule(self.layers))
        return {f"{self.layers}.{i}.{output.rpartition('.')[0]}": (
                    tuple(f"{self.layers}.{i}.{n}" for n in inputs), f"{self.layers}.{i}.{output}",
                    blocks) for i in range(layers)}

    def attentions(self, model: nn.Module) -> dict[str, tuple[str, str, int, int, int]]:
        """``{attention name: (v Linear, o Linear, heads, kv heads, head_dim)}`` per layer."""
        if self.heads is None:
            return {}
        v, o = self.heads
        out = {}
        for i in range(len(model.get_submodule(self.layers))):
            name = f"{self.layers}.{i}.{v.rpartition('.')[0]}"
            head_dim = getattr(model.get_submodule(name), "head_dim", None)
            v_out = model.get_submodule(f"{self.layers}.{i}.{v}").weight.shape[0]
            o_in = model.get_submodule(f"{self.layers}.{i}.{o}").weight.shape[1]
            if (not head_dim or v_out % head_dim or o_in % head_dim
                    or (o_in // head_dim) % (v_out // head_dim)):
                raise SieveError(f"{name}: v ({v_out}) and o ({o_in}) are not whole heads of "
                                 f"{head_dim}; use --projection.attention factored")
            out[name] = (f"{self.layers}.{i}.{v}", f"{self.layers}.{i}.{o}", o_in // head_dim,
                         v_out // head_dim, head_dim)
        return out

    def targets(self, model: nn.Module) -> list[str]:
        return [name for names in self.input_groups(model).values() for name in names]


LLAMA_LIKE = {
    "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_proj", "mlp.up_proj"),
    "mlp_out": ("mlp.down_proj",),
}
# q/k/v and gate/up fused into one Linear each: every group holds a single matrix
PHI3 = {
    "attn_in": ("self_attn.qkv_proj",),
    "attn_out": ("self_attn.o_proj",),
    "mlp_in": ("mlp.gate_up_proj",),
    "mlp_out": ("mlp.down_proj",),
}
# transformers Conv1D modules (weights stored in × out; see factored.dense_weight)
GPT2 = {
    "attn_in": ("attn.c_attn",),
    "attn_out": ("attn.c_proj",),
    "mlp_in": ("mlp.c_fc",),
    "mlp_out": ("mlp.c_proj",),
}

GATED_MLP = (("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj", 1)
VO = ("self_attn.v_proj", "self_attn.o_proj")

ADAPTERS = [
    Adapter("llama", ("llama", "mistral", "qwen2", "gemma3_text"), "model.layers", LLAMA_LIKE,
            GATED_MLP, VO),
    # Gemma 3 with a vision tower (Gemma3ForConditionalGeneration): only its language model
    Adapter("gemma3", ("gemma3",), "model.language_model.layers", LLAMA_LIKE, GATED_MLP,
            VO, "text_config.intermediate_size"),
    Adapter("phi3", ("phi3",), "model.layers", PHI3, (("mlp.gate_up_proj",), "mlp.down_proj", 2)),
    Adapter("gpt2", ("gpt2",), "transformer.h", GPT2, (("mlp.c_fc",), "mlp.c_proj", 1),
            mlp_size="n_inner"),
]


def supported_model_types() -> list[str]:
    return sorted(t for a in ADAPTERS for t in a.model_types)


def adapter_for(config) -> Adapter:
    """The adapter for a transformers config; a clear error for anything else."""
    model_type = getattr(config, "model_type", None) or ""
    model_type = model_type.removeprefix("sieve_")  # a sieve-pl export of a supported model
    for adapter in ADAPTERS:
        if model_type in adapter.model_types:
            return adapter
    raise SieveError(f"unsupported architecture {model_type!r}; supported model types: "
                     f"{', '.join(supported_model_types())}")
