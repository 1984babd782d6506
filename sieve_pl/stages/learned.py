"""Learned projections: each matrix's factors fitted by gradient descent (``method: learned``).

The paper fits its output-aligned, non-orthogonal projections by gradient descent; this is that
procedure as a Lightning fit. Each step runs a calibration batch through the frozen dense model;
forward pre-hooks capture every input group's non-padding tokens ``X``, and every target's
``A`` (K × D) and ``B`` (H × K) take one Adam step on

    L = Σ_{r=1..K} ‖W X − B[:, :r] A[:r] X‖²  /  (K · tr(W C Wᵀ))

(the nested error over every prefix rank, relative to the matrix's output energy over the
calibration tokens, ``C = Σ xxᵀ`` from the calibration stage). Nothing but one batch's activations
is held; the targets ``W x`` are computed from the weights, not stored.

Why the nested objective. The search cuts every matrix at a rank of its own by slicing
``B[:, :r] A[:r]``, so the factors must be good at every prefix, not only at K: a loss at K alone
leaves them free up to any invertible K × K mixing, and a prefix of mixed factors is far from the
best rank-r matrix. Learning only the ranks the search asks for is not possible either: the search runs after
this stage and tries many ranks per matrix. Summing the errors of all prefixes orders the
directions, and costs nothing in optimality: the closed form (``output_aligned``: the top
eigenvectors of ``W C Wᵀ``) is optimal at every rank at once, so it minimises every term of the
sum and hence the sum. Gradient descent can therefore only approach the closed form's error at
each rank, never beat it on the same tokens. Every rank weighs the same, like the search's evenly
spaced keep ladder. The sum over all K prefixes costs one reconstruction (``nested_error``).

What it is for: on this quadratic loss the closed form is the exact optimum and needs no
training, so ``learned`` does not improve on ``output_aligned``; it reproduces the paper's
procedure, measures how close gradient descent gets, and is the place for objectives without a
closed form. ``init: closed_form`` starts at the optimum (and, with a small lr, stays there).

Memory: one batch's activations plus about four times the target weights in float32 (A and B,
their gradients, Adam's two moments); ``layers_per_fit`` fits the layers a few at a time (each part
its own fit, whose forward stops after its last layer).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader

from ..io import atomic, resumable
from ..models.factored import dense_weight
from ..units import max_rank
from ..models.forward import last_logits
from ..models.hooks import Capture, until_stop
from ..training import Checkpointed, frozen_except, resume_fit, trainer_for


@dataclass
class LearnedConfig:
    """Projections fitted by gradient descent on calibration activations (``method: learned``).

    Args:
        init: random (a random orthonormal B with A = Bᵀ W, as the paper starts) or closed_form
            (start at the output_aligned optimum; give it a small lr, as Adam's steps do not
            shrink with the gradient).
        epochs: passes over the calibration split.
        lr: Adam learning rate relative to each factor's RMS entry at the start (Adam moves
            every entry by about the rate, so a relative rate suits factors of any size).
        schedule: cosine (decay to 0 over the fit: minibatch noise dies out at the end) or
            constant.
        batch_size: examples per step (none: the data's batch_size).
        layers_per_fit: fit this many decoder layers at a time (0: all in one fit); bounds the
            optimiser's memory for large models.
        seed: seed of the random start.
    """

    init: Literal["random", "closed_form"] = "random"
    epochs: int = 30
    lr: float = 0.3
    schedule: Literal["cosine", "constant"] = "cosine"
    batch_size: int | None = None
    layers_per_fit: int = 0
    seed: int = 0


def nested_error(y: torch.Tensor, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_{r=1..K} ‖Y − Z[:, :r] B[:, :r]ᵀ‖²`` for tokens in rows (``Z = X Aᵀ``), in one pass.

    Rank r's error is ``‖Y‖² − 2 Σ_{i≤r} P_i + Σ_{i,j≤r} G_ij S_ij`` with ``P_i = Σ_n z_ni
    (y_n · b_i)``, ``G = BᵀB`` and ``S = ZᵀZ``; summed over r, term (i, j) counts once for every
    r ≥ max(i, j). Costs ``O(N K (H + K))``, like a single reconstruction.
    """
    k = z.shape[1]
    times = torch.arange(k, 0, -1, dtype=z.dtype, device=z.device)  # ranks that keep column i
    p = (z * (y @ b)).sum(0)
    pairs = torch.minimum(times[:, None], times[None, :]) * (b.T @ b) * (z.T @ z)
    return k * y.pow(2).sum() - 2 * (times * p).sum() + pairs.sum()


def random_start(w: torch.Tensor, k: int, generator: torch.Generator):
    """A random K-dim output subspace: orthonormal ``B``, ``A = Bᵀ W`` (the right scale)."""
    g = torch.randn(w.shape[0], k, generator=generator, dtype=torch.float64)
    b = torch.linalg.qr(g).Q
    return b.T @ w.double(), b


def _targets(groups: dict[str, list[str]]) -> list[tuple[str, str]]:
    """(input key, matrix name) of every target, in forward order."""
    return [(key, name) for key, names in groups.items() for name in names]


def _parts(groups: dict[str, list[str]], layers_per_fit: int) -> list[dict[str, list[str]]]:
    """Groups split into runs of ``layers_per_fit`` layers (keys read ``<layer>.<group>``)."""
    layers = list(dict.fromkeys(key.rsplit(".", 1)[0] for key in groups))
    size = layers_per_fit if layers_per_fit > 0 else len(layers)
    return [{k: v for k, v in groups.items() if k.rsplit(".", 1)[0] in layers[i:i + size]}
            for i in range(0, len(layers), size)]


def _read_part(path: Path, part: dict[str, list[str]]) -> dict[str, tuple]:
    """A finished part's ``(A, B)`` per matrix (a KeyError if the file lacks one)."""
    flat = load_file(str(path))
    return {name: (flat[f"{name}.A"], flat[f"{name}.B"]) for _, name in _targets(part)}


class LearnedProjection(Checkpointed):
    """Adam on every target's (A, B) against the nested error, on inputs captured by hooks."""

    def __init__(self, net: nn.Module, groups: dict[str, list[str]],
                 start: dict[str, tuple[torch.Tensor, torch.Tensor]],
                 energy: dict[str, float], config: LearnedConfig, checkpoints: Path):
        super().__init__(checkpoints)
        self.net, self.groups, self.config = net, groups, config
        self.targets = _targets(groups)
        self.A = nn.ParameterList([start[n][0].float().clone() for _, n in self.targets])
        self.B = nn.ParameterList([start[n][1].float().clone() for _, n in self.targets])
        self.energy = [max(energy[n], 1e-30) for _, n in self.targets]
        # Adam moves every entry by about the learning rate, whatever its size: steps are made
        # relative to each factor's RMS entry, so one lr suits every matrix and model size
        self.rms = [[float(t.detach().pow(2).mean().sqrt().clamp(min=1e-12)) for t in ab]
                    for ab in zip(self.A, self.B)]
        self._inputs: dict[str, torch.Tensor] = {}
        self._mask = None

    @contextmanager
    def capturing(self, stop_after: str | None):
        """Hooks that keep each group's non-padding inputs; the forward stops after a layer."""
        def keep(key, x):
            self._inputs[key] = x[self._mask].float()

        firsts = {key: self.net.get_submodule(names[0]) for key, names in self.groups.items()}
        with Capture(firsts, keep,
                     stop_after=self.net.get_submodule(stop_after) if stop_after else None):
            yield

    def training_step(self, batch, batch_idx):
        self._mask, self._inputs = batch["attention_mask"].bool(), {}
        with torch.no_grad():
            until_stop(last_logits, self.net, batch)
        loss = 0.0
        for i, (key, name) in enumerate(self.targets):
            x = self._inputs[key]
            y = x @ dense_weight(self.net.get_submodule(name)).detach().float().T
            a, b = self.A[i], self.B[i]
            loss = loss + nested_error(y, x @ a.T, b) / (a.shape[0] * self.energy[i])
        # summed over an epoch: the mean relative nested error over the calibration tokens
        self.log("train_error", loss / len(self.targets), prog_bar=True, on_step=False,
                 on_epoch=True, reduce_fx="sum", batch_size=len(batch["input_ids"]))
        return loss

    def configure_optimizers(self):
        optimizer = torch.optim.Adam([{"params": [t], "lr": self.config.lr * rms}
                                      for ab, rmss in zip(zip(self.A, self.B), self.rms)
                                      for t, rms in zip(ab, rmss)])
        if self.config.schedule == "constant":
            return optimizer
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def saves(self, key: str) -> bool:
        return key.startswith(("A.", "B."))  # the factors

    def bases(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {name: (a.detach().cpu(), b.detach().cpu())
                for (_, name), a, b in zip(self.targets, self.A, self.B)}


def learn(make_trainer, net: nn.Module, groups: dict[str, list[str]],
          stats: dict[str, torch.Tensor], loader: DataLoader, config: LearnedConfig, work: Path,
          start: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
          ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{matrix name: (A_full, B_full)}`` fitted on ``loader``'s tokens (``project``'s contract).

    ``start``: initial factors (the closed form); none draws random ones. Each part of the fit
    checkpoints to ``work/part-<i>/last.ckpt`` and leaves ``work/part-<i>.safetensors`` when done,
    so a rerun skips finished parts and resumes the unfinished one.
    """
    work = Path(work)
    if config.batch_size:
        loader = DataLoader(loader.dataset, batch_size=config.batch_size,
                            collate_fn=loader.collate_fn)
    order = {name: i for i, (_, name) in enumerate(_targets(groups))}
    bases = {}
    for i, part in enumerate(_parts(groups, config.layers_per_fit)):
        done = work / f"part-{i}.safetensors"
        fitted = resumable(done, lambda path: _read_part(path, part), "fitting this part again")
        if fitted is not None:
            bases.update(fitted)
            continue
        initial, energy = {}, {}
        for key, name in _targets(part):
            w = dense_weight(net.get_submodule(name)).detach().double()
            c = stats[key].to(w.device, torch.float64)
            energy[name] = float(((w @ c) * w).sum())  # tr(W C Wᵀ) = Σ ‖W x‖²
            initial[name] = start[name] if start else random_start(
                w.cpu(), max_rank(*w.shape),
                torch.Generator().manual_seed(config.seed * 1_000_003 + order[name]))
        folder = work / f"part-{i}"
        module = LearnedProjection(net, part, initial, energy, config, folder)
        trainer = trainer_for(make_trainer, work, max_epochs=config.epochs)
        stop_after = next(reversed(part)).rsplit(".", 1)[0]
        with frozen_except(net), module.capturing(stop_after):
            resume_fit(trainer, module, loader)
        fitted = module.bases()
        if trainer.is_global_zero:  # (whole or absent: a rerun trusts a part that exists)
            with atomic(done) as tmp:
                save_file({f"{n}.{p}": t.contiguous() for n, ab in fitted.items()
                           for p, t in zip("AB", ab)}, str(tmp))
        bases.update(fitted)
    dtype = next(net.parameters()).dtype
    return {name: (a.to(dtype).contiguous(), b.to(dtype).contiguous())
            for name, (a, b) in bases.items()}
