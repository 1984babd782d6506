"""Where the whole-model stages run a model: on each process's accelerator, or split over the
node's GPUs by accelerate's device map when no single GPU holds it (one process then).

Only the choice and the dispatch live here; calibration and projection never need either (they
run one decoder layer at a time), and the Pruner builds every unit on its layer's device, so a
split model is pruned in place wherever its layers are.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import SieveError

FITS = 0.7  # of one accelerator's memory: the rest is activations, pruned copies, workspace


def weight_bytes(net: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in net.parameters())


def is_split(net: nn.Module) -> bool:
    """A model accelerate dispatched over several devices: it is never moved as a whole."""
    return len(set(getattr(net, "hf_device_map", {}).values())) > 1


def choose(placement: str, net: nn.Module, device: torch.device) -> str:
    """``device`` or ``split`` for ``placement`` (auto: split only a model whose weights take
    more than ``FITS`` of the accelerator's memory)."""
    if placement != "auto":
        return placement
    if device.type != "cuda":
        return "device"
    total = torch.cuda.get_device_properties(device).total_memory
    return "device" if weight_bytes(net) <= FITS * total else "split"


def dispatch(net: nn.Module, adapter) -> dict:
    """Spread ``net`` over every visible GPU, whole decoder layers per GPU (accelerate's
    ``infer_auto_device_map`` + ``dispatch_model``); refuses a map that would leave weights on
    the host or disk. Returns the device map."""
    from accelerate import dispatch_model, infer_auto_device_map

    if not torch.cuda.is_available() or torch.cuda.device_count() < 1:
        raise SieveError("model.placement split needs GPUs; none is visible")
    layer = type(net.get_submodule(adapter.layers)[0]).__name__
    limits = {i: int(FITS * torch.cuda.get_device_properties(i).total_memory)
              for i in range(torch.cuda.device_count())}
    device_map = infer_auto_device_map(net, max_memory=limits, no_split_module_classes=[layer])
    off = sorted({str(d) for d in device_map.values() if str(d) in ("cpu", "disk")})
    if off:
        need = weight_bytes(net) / 2**30
        have = sum(limits.values()) / 2**30
        raise SieveError(f"the model's weights ({need:.1f} GiB) do not fit {len(limits)} GPUs "
                         f"at {FITS:.0%} of their memory ({have:.1f} GiB); use more GPUs, "
                         f"model.dtype bfloat16, or see `sieve-pl plan`")
    dispatch_model(net, device_map)
    return device_map
