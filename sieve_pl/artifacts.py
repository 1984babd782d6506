"""Tensor artifacts: refit and distill write ``factors.safetensors`` (``stages/stage.py`` adds
their JSON; projection's per-layer bases files are ``sieve_pl.units.Bases``'). Tensors go to
safetensors and the rest to JSON, never pickle: loading a run folder cannot execute code."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors.torch import load_file

DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16",
          torch.bfloat16: "BF16", torch.int64: "I64", torch.int32: "I32", torch.int16: "I16",
          torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}


def save_tensors(tensors: dict[str, torch.Tensor], path: Path,
                 metadata: dict[str, str] | None = None) -> None:
    """A safetensors file written straight from the tensors' memory: safetensors' own
    ``save_file`` first builds the whole file in memory, a second copy of every tensor (2 GB
    for one layer's calibration statistics of an 8B model)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}
    header, offset = {}, 0
    for key, t in tensors.items():
        size = t.numel() * t.element_size()
        header[key] = {"dtype": DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + size]}
        offset += size
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(text)))
        out.write(text)
        for t in tensors.values():
            if t.numel():
                out.write(memoryview(t.view(-1).view(torch.uint8).numpy()))


def save_factors(factors: dict, folder: Path, name: str = "factors.safetensors") -> None:
    """Refitted weights: a tuple of tensors per unit (``(A, B)``, ``(W_down,)``)."""
    save_tensors({f"{n}.{i}": t for n, ts in factors.items() for i, t in enumerate(ts)},
                 folder / name)


def load_factors(folder: Path, name: str = "factors.safetensors") -> dict:
    flat = load_file(str(folder / name))
    factors: dict[str, list] = {}
    for key in sorted(flat, key=lambda k: int(k.rpartition(".")[2])):
        factors.setdefault(key.rpartition(".")[0], []).append(flat[key])
    return {n: tuple(ts) for n, ts in factors.items()}
