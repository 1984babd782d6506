"""Stage artifacts: project writes ``bases.safetensors``, refit and distill ``refit.json`` +
``factors.safetensors``, recover ``recover.json`` + ``weights.safetensors``. Tensors go to
safetensors and the rest to JSON, never pickle: loading a run folder cannot execute code."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .io import read_json, write_json
from .models.pruning import flatten_bases, unflatten_bases


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def save_bases(bases, folder: Path, name: str = "bases.safetensors") -> None:
    tensors, metadata = flatten_bases(bases)
    save_file(tensors, str(folder / name), metadata=metadata)


def load_bases(folder: Path, name: str = "bases.safetensors"):
    with safe_open(str(folder / name), "pt") as f:
        metadata = f.metadata()
    return unflatten_bases(load_file(str(folder / name)), metadata)


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


def save_refit(result: dict, folder: Path) -> None:
    write_json(folder / "refit.json", {k: v for k, v in result.items() if k != "factors"})
    save_factors(result["factors"], folder)


def load_refit(folder: Path) -> dict:
    return {**read_json(folder / "refit.json"), "factors": load_factors(folder)}


def save_recover(result: dict, folder: Path) -> None:
    write_json(folder / "recover.json", {k: v for k, v in result.items() if k != "weights"})
    save_tensors(result["weights"], folder / "weights.safetensors")


def load_recover(folder: Path) -> dict:
    return {**read_json(folder / "recover.json"),
            "weights": load_file(str(folder / "weights.safetensors"))}
