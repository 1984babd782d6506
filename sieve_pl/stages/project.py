"""Projection: one decomposition per target matrix, from which every rank is a slice.

For ``W`` (H × D) with input second moment ``C``:

- ``output_aligned`` (default): eigenvectors ``U`` of the output covariance ``W C Wᵀ``, sorted by
  eigenvalue; rank R keeps ``B = U_R``, ``A = U_Rᵀ W``. This minimises ``‖WX − BAX‖²`` over all
  rank-R matrices (reduced-rank regression), and the error is the sum of the discarded eigenvalues.
- ``weight_svd``: truncated SVD of W (ignores the data).
- ``input_pca``: top eigenvectors ``V`` of C (SliceGPT-like): ``A = V_Rᵀ``, ``B = W V_R``.
- ``learned``: A and B fitted by gradient descent on the calibration activations, as the paper
  does (a Lightning fit; see ``learned.py``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from tqdm.auto import tqdm

from ..errors import SieveError
from ..models.factored import dense_weight
from ..models.pruning import max_rank
from .learned import LearnedConfig, learn


@dataclass
class ProjectionConfig:
    """How each matrix's bases are computed.

    Args:
        method: output_aligned (task-aware optimum), weight_svd or input_pca (baselines), or
            learned (output-aligned factors fitted by gradient descent, as in the paper).
        dtype: dtype of the decompositions (float64 ranks tiny eigenvalues reliably).
        device: where decompositions run (cpu, cuda, or auto = the model's device).
        learned: the gradient-descent fit of method learned.
    """

    method: Literal["output_aligned", "weight_svd", "input_pca", "learned"] = "output_aligned"
    dtype: str = "float64"
    device: str = "auto"
    learned: LearnedConfig = field(default_factory=LearnedConfig)


def _eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return values.flip(0), vectors.flip(1)


def output_aligned(w: torch.Tensor, c: torch.Tensor, k: int):
    _, u = _eigh_desc(w @ c @ w.T)
    u = u[:, :k]
    return u.T @ w, u


def weight_svd(w: torch.Tensor, c: torch.Tensor, k: int):
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return s[:k, None] * vh[:k], u[:, :k]


def input_pca(w: torch.Tensor, c: torch.Tensor, k: int):
    _, v = _eigh_desc(c)
    v = v[:, :k]
    return v.T, w @ v


METHODS = {"output_aligned": output_aligned, "weight_svd": weight_svd, "input_pca": input_pca}


def project(net: torch.nn.Module, groups: dict[str, list[str]], stats: dict[str, torch.Tensor],
            config: ProjectionConfig, make_trainer=None, loader=None, work: Path | None = None
            ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{matrix name: (A_full, B_full)}`` up to each matrix's largest parameter-saving rank.

    ``learned`` trains: it needs ``make_trainer`` (a Trainer factory), the calibration ``loader``
    and a ``work`` folder for its checkpoints.
    """
    if config.method == "learned":
        if make_trainer is None or loader is None or work is None:
            raise SieveError("projection.method learned needs a trainer factory, the calibration "
                             "data and a work folder")
        start = None
        if config.learned.init == "closed_form":
            start = project(net, groups, stats, replace(config, method="output_aligned"))
        return learn(make_trainer, net, groups, stats, loader, config.learned, work, start)
    dtype = getattr(torch, config.dtype)
    fit = METHODS[config.method]
    bases = {}
    todo = [(key, name) for key, names in groups.items() for name in names]
    for key, name in tqdm(todo, desc=f"project ({config.method})", unit="matrix"):
        w = dense_weight(net.get_submodule(name)).detach()
        device = w.device if config.device == "auto" else torch.device(config.device)
        c = stats[key].to(device, dtype) / max(int(stats[f"{key}.count"]), 1)
        a, b = fit(w.to(device, dtype), c, max_rank(*w.shape))
        bases[name] = (a.to("cpu", w.dtype).contiguous(), b.to("cpu", w.dtype).contiguous())
    return bases
