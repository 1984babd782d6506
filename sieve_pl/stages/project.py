"""Projection: every unit's basis, computed once so that every level is a slice of it.

Layer by layer: one decoder layer's dense weights and input statistics go to the accelerator,
each of its units fits its basis there (``sieve_pl.units``: a matrix's factorisation, an MLP's
neuron order and refit, an attention layer's value-dimension projection), and the layer's bases
are written to one file before the next layer starts — a killed projection resumes at the
first layer without a file, and memory holds one layer's work whatever the depth. Under DDP
the layers are shared out by their estimated cost, not round-robin.
"""
from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import SieveError
from ..io import crash_point
from ..maths import second_moment
from ..models.factored import dense_shape
from ..progress import quiet
from ..units import Bases, Factors, HeadSpec, NeuronSpec, Spec, save_layer, unit_for
from .learned import LearnedConfig, learn
from .stage import Context, Stage


@dataclass
class ProjectionConfig:
    """How each matrix's bases are computed.

    Args:
        method: output_aligned (task-aware optimum), weight_svd or input_pca (baselines), or
            learned (output-aligned factors fitted by gradient descent, as in the paper).
        dtype: dtype of the decompositions, on the device (float32: what accelerators run
            fast; bench/README compares float64). Bases are stored in float32 either way.
        device: where decompositions run (auto = the run's accelerator, one layer at a time;
            or cpu, cuda, cuda:1...).
        learned: the gradient-descent fit of method learned.
        mlp: how an MLP is pruned: neurons (one unit: keep a subset of its inner dimension,
            rows of gate/up and columns of down, and refit down's kept columns; the result is
            smaller dense Linears) or factored (gate, up and down each factored by ``method``).
        attention: how v and o are pruned: factored (each by ``method``; default: the larger
            cut at the same test accuracy, bench/README "Attention value dimensions") or heads
            (one unit per layer: each kv head keeps r of its d value dimensions, v and o shrink
            by r/d as plain smaller Linears and o is refitted; needs separate v/o Linears, else
            factored). q and k are factored either way.
        ridge: damping of the refits (down on kept neurons, o on kept value dimensions)
            towards the dense weights, relative to the mean diagonal of the input's second
            moment: ``W C_λ[:, S] C_λ[S, S]⁻¹`` with ``C_λ = C + ridge·mean(diag C)·I``, which
            is ``W`` itself when every neuron is kept (damping towards zero, as before, shrank
            the kept weights too).
        neuron_order: greedy (each next neuron the one whose refit explains the most remaining
            output energy of down: a pivoted Cholesky, blocked) or magnitude
            (``‖W_down[:, j]‖²·C[j, j]``, the cheap baseline).
    """

    method: Literal["output_aligned", "weight_svd", "input_pca", "learned"] = "output_aligned"
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "auto"
    learned: LearnedConfig = field(default_factory=LearnedConfig)
    mlp: Literal["neurons", "factored"] = "neurons"
    attention: Literal["heads", "factored"] = "factored"
    ridge: float = 0.1
    neuron_order: Literal["greedy", "magnitude"] = "greedy"

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    def check(self) -> None:
        if not self.ridge > 0:
            raise SieveError(f"projection.ridge must be > 0, got {self.ridge}")


def layer_index(name: str) -> int:
    """``model.layers.3.mlp`` -> 3."""
    return int(re.search(r"\.(\d+)(\.|$)", name).group(1))


def unit_specs(groups: dict[str, list[str]], config: ProjectionConfig,
               mlps: dict | None = None, attentions: dict | None = None) -> dict[str, Spec]:
    """Every unit, in forward order: with ``config.mlp`` neurons, one per MLP (``Adapter.mlps``)
    whose down input is among ``groups``; with ``config.attention`` heads, one per attention
    layer (``Adapter.attentions``) whose o input is; every other target matrix on its own."""
    linears = {name for names in groups.values() for name in names}
    specs: dict[str, Spec] = {}
    for name, (inputs, output, blocks) in ((mlps or {}) if config.mlp == "neurons" else {}).items():
        if output in linears:
            specs[name] = NeuronSpec(name, (*inputs, output), output, tuple(inputs), blocks)
    for name, (v, o, heads, kv, head_dim) in (
            (attentions or {}) if config.attention == "heads" else {}).items():
        if o in linears:
            specs[name] = HeadSpec(name, (v, o), o, v, o, heads, kv, head_dim)
    covered = {n for spec in specs.values() for n in spec.linears}
    specs.update({n: Spec(n, (n,), n) for n in sorted(linears - covered, key=_forward(groups))})
    return dict(sorted(specs.items(), key=lambda item: (layer_index(item[0]),
                                                        _forward(groups)(item[1].output))))


def _forward(groups: dict[str, list[str]]):
    position = {n: i for i, n in enumerate(n for names in groups.values() for n in names)}
    return position.__getitem__


def cost(net, spec: Spec) -> float:
    """Rough flops of fitting one unit's basis (for sharing layers out over ranks)."""
    out_features, in_features = dense_shape(net.get_submodule(spec.output))
    if isinstance(spec, NeuronSpec):
        return 2.0 * out_features * in_features ** 2 + in_features ** 3
    if isinstance(spec, HeadSpec):
        return 4.0 * out_features * in_features * spec.head_dim
    return 10.0 * out_features ** 3 + 2.0 * out_features * in_features ** 2


def share(costs: dict[int, float], world: int) -> list[list[int]]:
    """Layers per rank, largest first to the least loaded rank (LPT): every rank computes the
    same answer, and no rank gets all the MLPs."""
    loads, shares = [0.0] * world, [[] for _ in range(world)]
    for layer, c in sorted(costs.items(), key=lambda kv: (-kv[1], kv[0])):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += c
        shares[rank].append(layer)
    return [sorted(s) for s in shares]


def project(net: torch.nn.Module, groups: dict[str, list[str]], stats, config: ProjectionConfig,
            make_trainer=None, loader=None, work: Path | None = None,
            mlps: dict | None = None, attentions: dict | None = None, bars: bool = True,
            device: torch.device | str | None = None, layers: list[int] | None = None) -> Bases:
    """Every unit's basis (:func:`unit_specs`), layer by layer on ``device`` (default: where the
    model is; ``config.device`` other than auto overrides it).

    With ``work``, each layer's bases go to ``work/bases-<layer>.safetensors`` as they are done
    (a layer whose file exists is skipped: a killed projection resumes) and the folder is
    returned; ``layers`` limits this call to some layers (a rank's share). ``learned`` trains:
    it needs ``make_trainer`` (a Trainer factory), the calibration ``loader`` and ``work``.
    """
    specs = unit_specs(groups, config, mlps, attentions)
    if config.device != "auto":
        device = torch.device(config.device)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    key_of = {name: key for key, names in groups.items() for name in names}
    learned = _learned(net, groups, specs, stats, config, make_trainer, loader, work, bars,
                       device) if config.method == "learned" else {}
    by_layer: dict[int, dict[str, Spec]] = {}
    for name, spec in specs.items():
        by_layer.setdefault(layer_index(name), {})[name] = spec
    found: dict[str, tuple[Spec, object]] = {}
    todo = [i for i in by_layer if layers is None or i in layers]
    for index in tqdm(todo, desc=f"project ({config.method}, {config.mlp} MLPs)", unit="layer",
                      disable=not bars):
        path = None if work is None else Path(work) / f"bases-{index:05d}.safetensors"
        if path is not None and path.exists():
            continue
        moments: dict[str, torch.Tensor] = {}

        def moment(linear: str) -> torch.Tensor:
            key = key_of[linear]
            if key not in moments:  # q/k/v, gate/up: one read per input
                moments[key] = second_moment(stats, key, device, getattr(torch, config.dtype))
            return moments[key]

        layer = {name: (spec, learned[name] if name in learned else
                        unit_for(spec).fit(net, spec, moment, config, device))
                 for name, spec in by_layer[index].items()}
        if path is None:
            found.update(layer)
        else:
            save_layer(layer, path)
            crash_point("project:layer")
    return Bases.memory(found) if work is None else Bases.folder(work)


def _learned(net, groups, specs, stats, config, make_trainer, loader, work, bars, device
             ) -> dict[str, tuple[Spec, Factors]]:
    """The ``learned`` method: every matrix unit's factors fitted by gradient descent in one
    data-parallel fit (optionally started from the closed form)."""
    if make_trainer is None or loader is None or work is None:
        raise SieveError("projection.method learned needs a trainer factory, the calibration "
                         "data and a work folder")
    matrices = {n for n, spec in specs.items() if type(spec) is Spec}
    mine = {key: [n for n in names if n in matrices] for key, names in groups.items()}
    mine = {key: names for key, names in mine.items() if names}
    start = None
    if config.learned.init == "closed_form":
        closed = project(net, mine, stats, replace(config, method="output_aligned"), bars=bars,
                         device=device)
        start = {}
        for name in closed:
            unit = unit_for(closed.specs[name])(net, closed.specs[name], lambda n=name: closed[n])
            start[name] = unit.factors(unit.shape[0] * unit.shape[1] // sum(unit.shape), None,
                                       "cpu")
    fitted = learn(make_trainer, net, mine, stats, loader, config.learned, Path(work), start)
    return {name: Factors(b.float().contiguous(), a.float().contiguous())
            for name, (a, b) in fitted.items()}


class Project(Stage):
    """Bases of every unit, layer by layer; under DDP each rank fits its share of layers."""

    name = "project"
    format = 3  # 3: one self-describing file per layer; float32; matrices store one side

    def __init__(self, ctx: Context, groups: dict[str, list[str]], stats,
                 config: ProjectionConfig):
        self.ctx, self.groups, self.stats, self.config = ctx, groups, stats, config
        lm = ctx.lm
        self.mlps = lm.adapter.mlps(lm.net)
        self.attentions = lm.adapter.attentions(lm.net) if config.attention == "heads" else {}

    def fingerprint(self) -> dict:
        """The settings of the chosen method only: the others change nothing."""
        config = asdict(self.config)
        config.pop("device")  # where the maths runs does not change what it gives
        if self.config.method != "learned":
            config.pop("learned")
        if self.config.mlp != "neurons":
            config.pop("neuron_order")
            if self.config.attention != "heads" or not self.attentions:
                config.pop("ridge")
        return config

    def run(self, work: Path) -> Path:
        ctx, net = self.ctx, self.ctx.lm.net
        trainer = ctx.trainer
        shards = work / "bases"
        if trainer.is_global_zero:
            shards.mkdir(exist_ok=True)
        trainer.strategy.barrier()
        specs = unit_specs(self.groups, self.config, self.mlps, self.attentions)
        costs: dict[int, float] = {}
        for name, spec in specs.items():
            costs[layer_index(name)] = costs.get(layer_index(name), 0.0) + cost(net, spec)
        mine = share(costs, trainer.world_size)[trainer.global_rank]
        learned = self.config.method == "learned"
        project(net, self.groups, self.stats, self.config, ctx.make_trainer if learned else None,
                ctx.calibration_loader() if learned else None, shards, self.mlps,
                self.attentions, not quiet(trainer), trainer.strategy.root_device, mine)
        trainer.strategy.barrier()
        return shards

    def save(self, shards: Path, folder: Path) -> None:
        for shard in sorted(Path(shards).glob("bases-*.safetensors")):
            os.replace(shard, folder / shard.name)

    def load(self, folder: Path) -> Bases:
        return Bases.folder(folder)
