"""Tensor artifacts: refit and distill write ``factors.safetensors`` (``stages/stage.py`` adds
their JSON; projection's per-layer bases files are ``sieve_pl.units.Bases``'). Tensors go to
safetensors and the rest to JSON, never pickle: loading a run folder cannot execute code."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


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
