"""Run a causal LM one decoder layer at a time (the sequential pipeline of llm-compressor and
SparseGPT): the model waits in host memory, one layer at a time is on the accelerator with the
cached activations of every batch, so accelerator memory is one layer plus a batch, whatever
the depth.

How each layer is called is captured, not rebuilt: every decoder layer is swapped for a stub that
records the arguments the model's own forward hands it (attention masks, rotary embeddings,
position ids — whatever the architecture passes, per layer: Gemma 3's sliding and global layers
get different masks) and stops the forward after the last layer. Layer ``i`` then runs on the
stored arguments with the hidden states the layer before it produced.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from .forward import last_logits
from .hooks import Stop, until_stop


class _Stub(nn.Module):
    def __init__(self, index: int, last: bool, calls: list):
        super().__init__()
        self.index, self.last, self.calls = index, last, calls

    def forward(self, *args, **kwargs):
        self.calls.append((self.index, args, kwargs))
        if self.last:  # nothing after the decoder layers is needed
            raise Stop
        return args[0] if args else kwargs["hidden_states"]


def _move(value, device, memo: dict | None = None):
    """Tensors (also inside tuples, lists, dicts) to ``device``; other values as they are.
    ``memo`` moves a tensor shared by several layers' arguments (a mask, the rotary
    embeddings) once."""
    memo = {} if memo is None else memo
    if torch.is_tensor(value):
        if id(value) not in memo:
            memo[id(value)] = value.to(device)
        return memo[id(value)]
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device, memo) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device, memo) for k, v in value.items()}
    return value


@dataclass
class Batch:
    """One batch between layers: the hidden states entering the next layer, the arguments
    every layer is called with (by layer), and the batch's attention mask."""

    hidden: torch.Tensor
    calls: dict[int, tuple[tuple, dict]]
    mask: torch.Tensor


def layer_list(net: nn.Module, layers: str) -> nn.ModuleList:
    return net.get_submodule(layers)


@contextmanager
def skeleton_on(net: nn.Module, layers: str, device: torch.device):
    """Everything but the decoder layers on ``device`` inside the block (embeddings, rotary,
    final norm), the layers where they were; the rest back where it was afterwards."""
    blocks = layer_list(net, layers)
    placeholder = nn.ModuleList(nn.Identity() for _ in blocks)
    parent, _, child = layers.rpartition(".")
    owner = net.get_submodule(parent) if parent else net
    setattr(owner, child, placeholder)
    homes = {t.device for t in (*net.parameters(), *net.buffers())}
    try:
        net.to(device)
        yield placeholder
    finally:
        if len(homes) == 1:  # (a model on several devices is never calibrated: it is split
            net.to(homes.pop())  # for the whole-model stages only, after calibration)
        setattr(owner, child, blocks)


@torch.no_grad()
def capture(net: nn.Module, layers: str, batches, device: torch.device,
            store: torch.device = torch.device("cpu")) -> list[Batch]:
    """For each batch, layer 0's input and every layer's call arguments, kept on ``store``."""
    count = len(layer_list(net, layers))
    out = []
    with skeleton_on(net, layers, device) as placeholder:
        calls: list = []
        for i in range(count):
            placeholder[i] = _Stub(i, i == count - 1, calls)
        for batch in batches:
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            calls.clear()
            until_stop(last_logits, net, batch)
            first = calls[0]
            hidden = first[1][0] if first[1] else first[2]["hidden_states"]
            per_layer, memo = {}, {}
            for index, args, kwargs in calls:
                kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
                per_layer[index] = (_move(args[1:], store, memo), _move(kwargs, store, memo))
            out.append(Batch(hidden.to(store), per_layer, batch["attention_mask"].bool().to(store)))
    return out


@torch.no_grad()
def run_layer(layer: nn.Module, index: int, batch: Batch, device: torch.device) -> torch.Tensor:
    """One layer's output hidden states for one batch, on ``device`` (the layer is there)."""
    args, kwargs = batch.calls[index]
    out = layer(batch.hidden.to(device), *_move(args, device), **_move(kwargs, device))
    return out[0] if isinstance(out, (tuple, list)) else out


def layer_by_layer(net: nn.Module, layers: str, batches: list[Batch], device: torch.device,
                   on_layer=None, desc: str = "layers", bars: bool = True) -> None:
    """Move each decoder layer to ``device`` in turn, run every batch through it (the hidden
    states are replaced by the layer's output, in place). ``on_layer(index, layer)`` is a
    context manager factory (hooks for statistics, say) entered before the layer's batches and
    left after them; what it yields, if not None, is called with each batch before it runs.
    Each layer goes back where it was."""
    blocks = layer_list(net, layers)
    for index in tqdm(range(len(blocks)), desc=desc, unit="layer", disable=not bars):
        layer = blocks[index]
        where = next(layer.parameters()).device
        layer.to(device)
        try:
            with (on_layer(index, layer) if on_layer else _nothing()) as before:
                for batch in batches:
                    if before is not None:
                        before(batch)
                    batch.hidden = run_layer(layer, index, batch, device).to(batch.hidden.device)
            del before  # (it may hold this layer's statistics: gone before the next layer's)
        finally:
            layer.to(where)


@contextmanager
def _nothing():
    yield
