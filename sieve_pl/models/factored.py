"""The factored Linear and the function that puts it into a model.

This file depends on torch only: it is copied verbatim into every exported model folder so the
folder loads with ``trust_remote_code=True`` on a machine without sieve_pl.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FactoredLinear(nn.Module):
    """``y = B(A x)``: a rank-R stand-in for an ``out × in`` Linear.

    A and B are ordinary ``nn.Linear`` children so peft (LoRA targets) and bitsandbytes (quantized
    Linears) see them like any other Linear. The original bias, if any, lives on ``B``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.B = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dense equivalent ``B @ A`` (for inspection; the forward never builds it)."""
        return self.B.weight @ self.A.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.B(self.A(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


class HeadPad(nn.Module):
    """v_proj keeping ``kept`` of each kv head's ``head_dim`` value dimensions.

    Its Linear produces ``heads × kept`` values; zeros fill each head back to ``head_dim`` so the
    attention's own reshape (and any attention kernel) works unchanged. The paired
    :class:`HeadSlice` o_proj never reads the zero dimensions.
    """

    def __init__(self, linear: nn.Module, heads: int, kept: int, head_dim: int):
        super().__init__()
        self.linear, self.heads, self.kept, self.head_dim = linear, heads, kept, head_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x).unflatten(-1, (self.heads, self.kept))
        return F.pad(y, (0, self.head_dim - self.kept)).flatten(-2)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, kept={self.kept}, head_dim={self.head_dim}"


class HeadSlice(HeadPad):
    """o_proj reading the first ``kept`` of each attention head's ``head_dim`` dimensions."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x.unflatten(-1, (self.heads, self.head_dim))[..., :self.kept]
                           .flatten(-2))


HEAD_MODULES = {"pad": HeadPad, "slice": HeadSlice}


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _transposed(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2) is a Linear whose weight is stored ``in × out``.

    Matched by class name: this file may not import transformers.
    """
    return type(module).__name__ == "Conv1D"


def dense_weight(module: nn.Module) -> torch.Tensor:
    """A target's weight as ``out × in``, whether it is an nn.Linear or a Conv1D."""
    return module.weight.T if _transposed(module) else module.weight


def dense_shape(module: nn.Module) -> tuple[int, int]:
    """A target's ``(out, in)``."""
    return tuple(dense_weight(module).shape)


def new_linear(like: nn.Module, out_features: int, in_features: int, bias: bool,
               device=None) -> nn.Module:
    """An uninitialised Linear of another size, of the same kind as ``like`` (Linear or
    Conv1D), on ``device`` (default: ``like``'s)."""
    w = like.weight
    device = device or w.device
    if _transposed(like):
        module = type(like)(out_features, in_features)  # Conv1D(nf=out, nx=in)
        if not bias:
            module.bias = None
        return module.to(device, w.dtype)
    return nn.Linear(in_features, out_features, bias=bias, device=device, dtype=w.dtype)


def linear_like(like: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                device=None) -> nn.Module:
    """A Linear of the kind of ``like`` holding ``weight`` (out × in) and ``bias``, on
    ``device`` (default: ``like``'s)."""
    module = new_linear(like, *weight.shape, bias is not None, device)
    with torch.no_grad():
        module.weight.copy_(weight.T if _transposed(like) else weight)
        if bias is not None:
            module.bias.copy_(bias)
    return module


def resize(model: nn.Module, shapes: dict[str, list[int]]) -> None:
    """Replace each named Linear (or Conv1D) by an uninitialised one of shape ``(out, in)``."""
    for name, (out_features, in_features) in shapes.items():
        old = model.get_submodule(name)
        set_submodule(model, name, new_linear(old, out_features, in_features,
                                              old.bias is not None))


def structure(model: nn.Module, reference: nn.Module) -> dict[str, dict]:
    """What differs from ``reference`` (the same architecture, unpruned, e.g. on the meta
    device): ``ranks`` of factored Linears, ``shapes`` of resized ones and ``heads`` of head-
    narrowed v/o (``[pad|slice, heads, kept, head_dim]``). :func:`rebuild` turns ``reference``'s
    layout into ``model``'s."""
    ranks, shapes, heads = {}, {}, {}
    for name, module in model.named_modules():
        if isinstance(module, FactoredLinear):
            ranks[name] = module.rank
        elif isinstance(module, HeadPad):
            kind = next(k for k, cls in HEAD_MODULES.items() if type(module) is cls)
            heads[name] = [kind, module.heads, module.kept, module.head_dim]
        elif isinstance(module, nn.Linear) or _transposed(module):
            parent = name.rpartition(".")[0]
            if isinstance(model.get_submodule(parent) if parent else model,
                          (FactoredLinear, HeadPad)):
                continue
            try:
                original = reference.get_submodule(name)
            except AttributeError:
                continue
            if dense_shape(original) != dense_shape(module):
                shapes[name] = list(dense_shape(module))
    return {"ranks": ranks, "shapes": shapes, "heads": heads}


def narrow_heads(model: nn.Module, heads: dict[str, list]) -> None:
    """Replace each named v (``pad``) / o (``slice``) Linear by an uninitialised head-narrowed
    one."""
    for name, (kind, count, kept, head_dim) in heads.items():
        old = model.get_submodule(name)
        out_features, in_features = dense_shape(old)
        if kind == "pad":
            out_features = count * kept
        else:
            in_features = count * kept
        linear = new_linear(old, out_features, in_features, old.bias is not None)
        set_submodule(model, name, HEAD_MODULES[kind](linear, count, kept, head_dim))


def rebuild(model: nn.Module, layout: dict) -> None:
    """Give an unpruned model the layout :func:`structure` recorded (uninitialised weights)."""
    resize(model, layout.get("shapes") or {})
    narrow_heads(model, layout.get("heads") or {})
    factorize(model, layout.get("ranks") or {})


def factorize(model: nn.Module, ranks: dict[str, int]) -> None:
    """Replace each named Linear (or Conv1D) by an uninitialised FactoredLinear of that rank."""
    for name, rank in ranks.items():
        old = model.get_submodule(name)
        out_features, in_features = dense_shape(old)
        set_submodule(model, name, FactoredLinear(
            in_features, out_features, int(rank), bias=old.bias is not None,
            device=old.weight.device, dtype=old.weight.dtype))
