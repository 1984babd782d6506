"""Pruning units: one module per kind (``matrix``, ``neurons``, ``heads``) behind one protocol
(``base.py``), and :class:`Bases`, every unit's spec and basis — in memory, or read one unit at
a time from the per-layer files projection writes."""
from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..io import atomic
from ..maths import eigh_desc
from .base import Spec, Unit, matrix_params
from .heads import HeadDims, HeadSpec, HeadUnit, head_basis
from .matrix import METHODS, Factors, MatrixUnit, max_rank, rank_for
from .neurons import NeuronSpec, Neurons, NeuronUnit, greedy_order, neuron_basis

__all__ = ["Bases", "Factors", "HeadDims", "HeadSpec", "HeadUnit", "KINDS", "METHODS",
           "MatrixUnit", "NeuronSpec", "NeuronUnit", "Neurons", "Spec", "Unit", "eigh_desc",
           "greedy_order", "head_basis", "matrix_params", "max_rank", "neuron_basis",
           "rank_for", "unit_for"]

KINDS: dict[str, type[Unit]] = {u.kind: u for u in (MatrixUnit, NeuronUnit, HeadUnit)}
SPEC_OF = {"matrix": Spec, "neurons": NeuronSpec, "heads": HeadSpec}
KIND_OF = {Spec: "matrix", NeuronSpec: "neurons", HeadSpec: "heads"}
CACHE_BELOW = 1 << 30  # bases files smaller than this in all are read into memory at once


def unit_for(spec: Spec) -> type[Unit]:
    return KINDS[KIND_OF[type(spec)]]


def _spec_record(spec: Spec) -> dict:
    return {"kind": KIND_OF[type(spec)], **asdict(spec)}


def _spec(record: dict) -> Spec:
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in record.items() if k != "kind"}
    return SPEC_OF[record["kind"]](**fields)


class Bases(Mapping):
    """``{unit name: basis}`` plus ``specs`` (which Linears each unit covers).

    Built in memory by projection, or over a folder of ``bases-*.safetensors`` files (one per
    decoder layer, each self-describing: its metadata holds its units' specs) whose tensors are
    read when a unit is used and not kept — so a 70B model's bases never sit in memory at once,
    whatever the depth. Folders under ``CACHE_BELOW`` bytes are read once instead (small models:
    faster candidates).
    """

    def __init__(self, specs: dict[str, Spec], load: Callable[[str], object]):
        self.specs, self._load = specs, load

    @classmethod
    def memory(cls, found: dict[str, tuple[Spec, object]]) -> "Bases":
        specs = {name: spec for name, (spec, _) in found.items()}
        bases = {name: basis for name, (_, basis) in found.items()}
        return cls(specs, bases.__getitem__)

    @classmethod
    def folder(cls, folder: Path, cache_below: int = CACHE_BELOW) -> "Bases":
        from safetensors import safe_open

        files, specs = {}, {}
        paths = sorted(Path(folder).glob("bases-*.safetensors"))
        for path in paths:
            with safe_open(str(path), "pt") as handle:
                for name, record in json.loads(handle.metadata()["units"]).items():
                    specs[name], files[name] = _spec(record), path

        def load(name: str):
            spec = specs[name]
            with safe_open(str(files[name]), "pt") as handle:
                keys = [k for k in handle.keys() if k.rpartition(".")[0] == name]
                tensors = {k.rpartition(".")[2]: handle.get_tensor(k) for k in keys}
            return unit_for(spec).basis_type.stored(tensors, {})

        bases = cls(specs, load)
        if sum(p.stat().st_size for p in paths) < cache_below:
            return cls(specs, {name: load(name) for name in specs}.__getitem__)
        return bases

    def __getitem__(self, name: str):
        return self._load(name)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)


def save_layer(found: dict[str, tuple[Spec, object]], path: Path) -> None:
    """One layer's units (``{name: (spec, basis)}``) as one self-describing safetensors file,
    written atomically: a reader (or a resumed projection) sees it whole or not at all."""
    from ..artifacts import save_tensors

    tensors = {f"{name}.{key}": t for name, (_, basis) in found.items()
               for key, t in basis.tensors().items()}
    metadata = {"units": json.dumps({name: _spec_record(spec) for name, (spec, _) in
                                     found.items()}, sort_keys=True)}
    with atomic(path) as tmp:
        save_tensors(tensors, tmp, metadata)


def tensor_bytes(basis) -> int:
    return sum(t.numel() * t.element_size() for t in basis.tensors().values()
               if isinstance(t, torch.Tensor))
