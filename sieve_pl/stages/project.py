"""Projection: one decomposition per target matrix, from which every rank is a slice.

For ``W`` (H × D) with input second moment ``C``:

- ``output_aligned`` (default): eigenvectors ``U`` of the output covariance ``W C Wᵀ``, sorted by
  eigenvalue; rank R keeps ``B = U_R``, ``A = U_Rᵀ W``. This minimises ``‖WX − BAX‖²`` over all
  rank-R matrices (reduced-rank regression), and the error is the sum of the discarded eigenvalues.
- ``weight_svd``: truncated SVD of W (ignores the data).
- ``input_pca``: top eigenvectors ``V`` of C (SliceGPT-like): ``A = V_Rᵀ``, ``B = W V_R``.
- ``learned``: A and B fitted by gradient descent on the calibration activations, as the paper
  does (a Lightning fit; see ``learned.py``).

With ``mlp: neurons`` (default) each MLP is one unit instead of three matrices: its neurons are
ordered once (:func:`neuron_basis`) and any prefix of that order is a level. With ``attention:
heads`` each attention layer's v and o are one unit: the value dimension of every kv
head is projected by a prefix of one stored basis (:func:`head_basis`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import SieveError
from ..models.factored import dense_weight
from ..models.pruning import Factors, HeadDims, Neurons, max_rank
from ..progress import quiet
from ..artifacts import load_bases, save_bases
from .learned import LearnedConfig, learn
from .stage import Context, Stage


@dataclass
class ProjectionConfig:
    """How each matrix's bases are computed.

    Args:
        method: output_aligned (task-aware optimum), weight_svd or input_pca (baselines), or
            learned (output-aligned factors fitted by gradient descent, as in the paper).
        dtype: dtype of the decompositions (float64 ranks tiny eigenvalues reliably).
        device: where decompositions run (cpu, cuda, or auto = the model's device).
        learned: the gradient-descent fit of method learned.
        mlp: how an MLP is pruned: neurons (one unit: keep a subset of its inner dimension,
            rows of gate/up and columns of down, and refit down's kept columns; the result is
            smaller dense Linears) or factored (gate, up and down each factored by ``method``).
        attention: how v and o are pruned: factored (each by ``method``; default: the larger
            cut measured on the demo, 35.3% vs 30.6% of decoder weights at the same test
            accuracy) or heads (one unit per layer: each kv head keeps r of its d value
            dimensions, v and o shrink by r/d as plain smaller Linears and o is refitted; needs
            separate v/o Linears, else factored). q and k are factored either way.
        ridge: damping of the refits (down on kept neurons, o on kept value dimensions)
            towards the dense weights, relative to the mean diagonal of the input's second
            moment: ``W C_λ[:, S] C_λ[S, S]⁻¹`` with ``C_λ = C + ridge·mean(diag C)·I``, which
            is ``W`` itself when every neuron is kept (damping towards zero, as before, shrank
            the kept weights too: one neuron removed of 1,536 flipped 47 of 400 answers).
            Default 0.1: the lowest held-out MLP error of 1e-2, 0.1 and 1 at every level, and
            on the demo the larger cut at epsilon 5% on two draws of the splits (bench/README).
        neuron_order: greedy (each next neuron the one whose refit explains the most remaining
            output energy of down: a pivoted Cholesky) or magnitude (``‖W_down[:, j]‖²·C[j, j]``,
            the cheap baseline).
    """

    method: Literal["output_aligned", "weight_svd", "input_pca", "learned"] = "output_aligned"
    dtype: str = "float64"
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


def eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.flip(0), vectors.flip(1)


def output_aligned(w: torch.Tensor, c: torch.Tensor, k: int):
    _, u = eigh_desc(w @ c @ w.T)
    u = u[:, :k]
    return u.T @ w, u


def weight_svd(w: torch.Tensor, c: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return s[:k, None] * vh[:k], u[:, :k]


def input_pca(w: torch.Tensor, c: torch.Tensor, k: int):
    _, v = eigh_desc(c)
    v = v[:, :k]
    return v.T, w @ v


METHODS = {"output_aligned": output_aligned, "weight_svd": weight_svd, "input_pca": input_pca}


def greedy_order(w: torch.Tensor, c_lam: torch.Tensor) -> torch.Tensor:
    """Neurons in the order a greedy refit wants them: each next one the column ``j`` whose
    addition to the kept set explains the most of ``W``'s remaining output energy,
    ``‖W R[:, j]‖² / R[j, j]`` with ``R`` the residual of ``C_λ`` after the kept columns (a
    pivoted Cholesky of ``C_λ``, O(I²·(I + H)) in all)."""
    n = c_lam.shape[0]
    residual_w = w @ c_lam  # W R, updated by rank one per step
    diag = c_lam.diagonal().clone()
    chol = torch.zeros_like(c_lam)  # columns in pivot order
    free = torch.ones(n, dtype=torch.bool, device=w.device)
    order = []
    for t in range(n):
        gain = residual_w.square().sum(0) / diag.clamp(min=1e-300)
        j = int(torch.where(free, gain, -torch.inf).argmax())
        col = c_lam[:, j] - chol[:, :t] @ chol[j, :t]
        col = col / col[j].clamp(min=1e-300).sqrt()
        chol[:, t] = col
        diag -= col.square()
        residual_w -= torch.outer(w @ col, col)
        free[j] = False
        order.append(j)
    return torch.tensor(order, device=w.device)


def neuron_basis(w_down: torch.Tensor, c: torch.Tensor, ridge: float, how: str
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(order, g, l_inv)`` of :class:`~sieve_pl.models.pruning.Neurons` for one MLP.

    The refit of down on the first k neurons ``S`` of ``order``, ``W C_λ[:, S] C_λ[S, S]⁻¹``
    (least squares on the calibration inputs plus ``λ·‖W' − W[:, S]‖²`` and ``λ·‖W[:, dropped]‖²``:
    damped towards the dense weights), equals ``g[:, :k] @ l_inv[:k, :k]`` because the Cholesky
    factor of a leading block is the leading block of the Cholesky factor (and so are their
    inverses). The greedy order minimises the same objective.
    """
    eye = torch.eye(c.shape[0], dtype=c.dtype, device=c.device)
    c_lam = c + ridge * c.diagonal().mean().clamp(min=1e-30) * eye
    if how == "greedy":
        order = greedy_order(w_down, c_lam)
    else:
        order = torch.argsort(w_down.square().sum(0) * c.diagonal(), descending=True)
    chol = torch.linalg.cholesky(c_lam[order][:, order])
    l_inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    return order, w_down @ c_lam[:, order] @ l_inv.T, l_inv


def head_basis(w_o: torch.Tensor, c: torch.Tensor, heads: int, kv: int, ridge: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(e, c_heads, ridge_heads)`` of :class:`~sieve_pl.models.pruning.HeadDims` for one layer.

    ``c`` is the second moment of o's input (heads·d square). For a kv head g read by query
    heads h, keeping the span of ``P``'s rows and refitting o (damped towards the dense o:
    ``C_λ,h = C_h + λ_h I``) captures ``Σ_h tr(W_h C_λ,h Pᵀ (P C_λ,h Pᵀ)⁻¹ P C_λ,h W_hᵀ)`` of
    o's output energy; with one head that is maximised by the top generalised eigenvectors of
    ``(C_λ,h W_hᵀ W_h C_λ,h, C_λ,h)``, and the group uses the sums over its heads. Rows are
    ordered by eigenvalue, so every level is a prefix.
    """
    d = c.shape[0] // heads
    blocks = torch.stack([c[h * d:(h + 1) * d, h * d:(h + 1) * d] for h in range(heads)])
    lam = ridge * blocks.diagonal(dim1=1, dim2=2).mean(1).clamp(min=1e-30)
    w = w_o.unflatten(1, (heads, d)).transpose(0, 1)  # heads × out × d
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    c_lam = blocks + lam[:, None, None] * eye
    cw = c_lam @ w.transpose(1, 2) @ w @ c_lam  # C_λ,h W_hᵀ W_h C_λ,h
    rep = heads // kv
    e = []
    for g in range(kv):
        a = cw[g * rep:(g + 1) * rep].sum(0)
        b = c_lam[g * rep:(g + 1) * rep].sum(0)
        chol_inv = torch.linalg.solve_triangular(torch.linalg.cholesky(b), eye, upper=False)
        _, u = eigh_desc(chol_inv @ a @ chol_inv.T)
        e.append(u.T @ chol_inv)  # rows: generalised eigenvectors, best first
    return torch.stack(e), blocks, lam


def project(net: torch.nn.Module, groups: dict[str, list[str]], stats: dict[str, torch.Tensor],
            config: ProjectionConfig, make_trainer=None, loader=None, work: Path | None = None,
            mlps: dict[str, tuple[tuple[str, ...], str, int]] | None = None,
            attentions: dict[str, tuple[str, str, int, int, int]] | None = None,
            bars: bool = True) -> dict[str, Factors | Neurons | HeadDims]:
    """Bases of every unit: ``{matrix name: Factors}`` up to each matrix's largest
    parameter-saving rank; with ``config.mlp`` neurons, ``{MLP name: Neurons}`` for the
    ``mlps`` (``Adapter.mlps``) whose down input is among ``groups``; with ``config.attention``
    heads, ``{attention name: HeadDims}`` for the ``attentions`` (``Adapter.attentions``) whose
    o input is among ``groups``.

    ``learned`` trains: it needs ``make_trainer`` (a Trainer factory), the calibration ``loader``
    and a ``work`` folder for its checkpoints.
    """
    mlps = (mlps or {}) if config.mlp == "neurons" else {}
    attentions = (attentions or {}) if config.attention == "heads" else {}
    in_units = {n for inputs, output, _ in mlps.values() for n in (*inputs, output)}
    in_units |= {n for v, o, *_ in attentions.values() for n in (v, o)}
    key_of = {name: key for key, names in groups.items() for name in names}
    matrices = {key: [n for n in names if n not in in_units] for key, names in groups.items()}
    matrices = {key: names for key, names in matrices.items() if names}
    bases: dict[str, Factors | Neurons | HeadDims] = {}
    dtype = getattr(torch, config.dtype)
    for name, (v, o, heads, kv, _) in attentions.items():
        if o not in key_of:
            continue
        w = dense_weight(net.get_submodule(o)).detach()
        device = w.device if config.device == "auto" else torch.device(config.device)
        key = key_of[o]
        c = stats[key].to(device, dtype) / max(int(stats[f"{key}.count"]), 1)
        e, blocks, lam = head_basis(w.to(device, dtype), c, heads, kv, config.ridge)
        bases[name] = HeadDims(e.to("cpu", w.dtype), blocks.to("cpu", torch.float32),
                               lam.to("cpu", torch.float32), v, o)
    mine = {m: spec for m, spec in mlps.items() if spec[1] in key_of}
    for mlp, (inputs, output, blocks) in tqdm(mine.items(), desc=f"project (neurons, "
                                              f"{config.neuron_order})", unit="mlp",
                                              disable=not bars):
        w = dense_weight(net.get_submodule(output)).detach()
        device = w.device if config.device == "auto" else torch.device(config.device)
        key = key_of[output]
        c = stats[key].to(device, dtype) / max(int(stats[f"{key}.count"]), 1)
        order, g, l_inv = neuron_basis(w.to(device, dtype), c, config.ridge, config.neuron_order)
        bases[mlp] = Neurons(order.cpu(), g.to("cpu", w.dtype), l_inv.to("cpu", w.dtype),
                             inputs, output, blocks)
    return {**bases, **_factored(net, matrices, stats, config, make_trainer, loader, work, bars)}


def _factored(net, groups, stats, config, make_trainer, loader, work, bars: bool = True
              ) -> dict[str, Factors]:
    if not groups:
        return {}
    if config.method == "learned":
        if make_trainer is None or loader is None or work is None:
            raise SieveError("projection.method learned needs a trainer factory, the calibration "
                             "data and a work folder")
        start = None
        if config.learned.init == "closed_form":
            start = {n: (f.a, f.b) for n, f in _factored(
                net, groups, stats, replace(config, method="output_aligned"), None, None,
                None, bars).items()}
        return {n: Factors(a, b) for n, (a, b) in
                learn(make_trainer, net, groups, stats, loader, config.learned, work,
                      start).items()}
    dtype = getattr(torch, config.dtype)
    fit = METHODS[config.method]
    bases = {}
    todo = [(key, name) for key, names in groups.items() for name in names]
    for key, name in tqdm(todo, desc=f"project ({config.method})", unit="matrix",
                          disable=not bars):
        w = dense_weight(net.get_submodule(name)).detach()
        device = w.device if config.device == "auto" else torch.device(config.device)
        c = stats[key].to(device, dtype) / max(int(stats[f"{key}.count"]), 1)
        a, b = fit(w.to(device, dtype), c, max_rank(*w.shape))
        bases[name] = Factors(a.to("cpu", w.dtype).contiguous(),
                              b.to("cpu", w.dtype).contiguous())
    return bases


class Project(Stage):
    """Bases of every unit; under DDP each rank decomposes every world-th input group."""

    name = "project"
    format = 2  # 2: the refits of down and o are damped towards the dense weights, not zero

    def __init__(self, ctx: Context, groups: dict[str, list[str]], stats,
                 config: ProjectionConfig):
        self.ctx, self.groups, self.stats, self.config = ctx, groups, stats, config
        lm = ctx.lm
        self.mlps = lm.adapter.mlps(lm.net)
        self.attentions = lm.adapter.attentions(lm.net) if config.attention == "heads" else {}

    def fingerprint(self) -> dict:
        """The settings of the chosen method only: the others change nothing."""
        config = asdict(self.config)
        if self.config.method != "learned":
            config.pop("learned")
        if self.config.mlp != "neurons":
            config.pop("neuron_order")
            if self.config.attention != "heads" or not self.attentions:
                config.pop("ridge")
        return config

    def run(self, work: Path) -> dict:
        ctx, net = self.ctx, self.ctx.lm.net
        if self.config.method == "learned":  # one data-parallel fit of every matrix
            return project(net, self.groups, self.stats, self.config, ctx.make_trainer,
                           ctx.calibration_loader(), work, self.mlps, self.attentions,
                           not quiet(ctx.trainer))
        world, rank = ctx.trainer.world_size, ctx.trainer.global_rank
        mine = {key: names for i, (key, names) in enumerate(self.groups.items())
                if i % world == rank}
        bases = project(net, mine, self.stats, self.config, mlps=self.mlps,
                        attentions=self.attentions, bars=not quiet(ctx.trainer))
        if world == 1:
            return bases
        save_bases(bases, work, f"bases-{rank}.safetensors")
        ctx.trainer.strategy.barrier()
        return {} if rank else {name: ab for r in range(world) for name, ab in
                                load_bases(work, f"bases-{r}.safetensors").items()}

    def save(self, bases: dict, folder: Path) -> None:
        save_bases(bases, folder)

    def load(self, folder: Path) -> dict:
        return load_bases(folder)
