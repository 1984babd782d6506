"""Calibration: second moments ``Σ xᵀx`` of every distinct target-Linear input over task tokens.

A predict loop of the CLI's Trainer runs the model over the calibration split; forward hooks on
the first Linear of each input group add the non-padding tokens' ``xᵀx`` into one sum per group.
Sums (not means) plus token counts are kept so ranks all-reduce them exactly.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ..errors import SieveError
from ..progress import named
from ..io import SafetensorsFolder, crash_point
from ..models.factored import dense_shape
from ..models.forward import last_logits
from .stage import Context, Stage


@dataclass
class CalibrationConfig:
    """Calibration statistics.

    Args:
        dtype: accumulator dtype of the Σ xᵀx sums (float64: no drift over millions of tokens;
            float32 halves memory).
        layers_per_pass: decoder layers whose statistics are accumulated in one pass over the
            calibration data (0 = all). The sums live on the model's device during a pass
            and go to disk after it, so k layers per pass hold k/L of the statistics at a time,
            for L/k passes (the memory formula is in the README).
        device: where the sums live: auto (the model's device) or cpu (each batch's xᵀx is
            computed on the model's device and added to a sum in host memory: accelerator
            memory for one group's xᵀx at a time, at the cost of a transfer per batch).
        product_dtype: dtype of each batch's xᵀx before it is added to the sum: float32 (at
            least the activations' precision, relative error ~1e-6 per batch; half the time
            of float64 on CPUs, where the statistics cost about a forward pass) or float64.
        examples: calibrate on this many examples of the calibration split, spread over it
            (0: all of it); the sensitivity seed's gradients and learned projections use the
            same. Lets a sweep vary the statistics' data while the validation and test splits,
            drawn after the calibration split, stay the same examples.
        read_weight: each sequence's last position (left padding: the token whose next-token
            logits a classification task reads) counts as this many tokens in the sums; 1 = all
            tokens alike. Most calibration tokens are the review text and the prompt template.
    """

    dtype: str = "float64"
    layers_per_pass: int = 0
    device: Literal["auto", "cpu"] = "auto"
    product_dtype: Literal["float32", "float64"] = "float32"
    examples: int = 0
    read_weight: int = 1

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise SieveError(f"calibration.dtype must be float32 or float64, got {self.dtype!r}")
        if self.layers_per_pass < 0 or self.examples < 0 or self.read_weight < 1:
            raise SieveError("calibration needs layers_per_pass >= 0, examples >= 0 and "
                             f"read_weight >= 1, got {self.layers_per_pass}, {self.examples}, "
                             f"{self.read_weight}")


class Calibration(L.LightningModule):
    """Runs the model and accumulates input second moments through forward hooks."""

    def __init__(self, net: torch.nn.Module, groups: dict[str, list[str]], dtype: str = "float64",
                 device: str = "auto", product_dtype: str = "float32", read_weight: int = 1):
        super().__init__()
        self.net, self.sum_device, self.read_weight = net, device, read_weight
        self.groups = groups
        self.sum_dtype = getattr(torch, dtype)
        # never below float32, never above the accumulator
        self.product_dtype = (torch.float64 if product_dtype == "float64"
                              and self.sum_dtype == torch.float64 else torch.float32)
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}
        self._mask = None
        self._handles = []

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0][self._mask].to(self.product_dtype)  # (non-padding tokens, in_features)
            xtx, n = x.T @ x, x.shape[0]
            if self.read_weight > 1:  # left padding: the last position is every row's own
                last, extra = args[0][:, -1].to(self.product_dtype), self.read_weight - 1
                xtx = xtx + extra * (last.T @ last)
                n += extra * last.shape[0]
            self.sums[key] += xtx.to(self.sums[key].device, self.sum_dtype)
            self.counts[key] += n
        return hook

    def on_predict_start(self) -> None:
        first = {key: self.net.get_submodule(names[0]) for key, names in self.groups.items()}
        self.sums = {key: torch.zeros((dense_shape(m)[1],) * 2, dtype=self.sum_dtype,
                                      device="cpu" if self.sum_device == "cpu" else m.weight.device)
                     for key, m in first.items()}
        self.counts = dict.fromkeys(self.groups, 0)
        self._handles = [m.register_forward_pre_hook(self._hook(key)) for key, m in first.items()]

    def predict_step(self, batch, batch_idx):
        self._mask = batch["attention_mask"].bool()
        last_logits(self.net, batch)
        crash_point("calibrate:batch")

    def on_predict_end(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        reduce_sums(self.sums)
        counts = {k: torch.tensor(n, device=self.sums[k].device) for k, n in self.counts.items()}
        self.counts = {k: int(n) for k, n in reduce_sums(counts).items()}


def reduce_sums(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over all ranks, in place (a no-op in one process).

    NCCL reduces CUDA tensors only: host tensors go through the GPU one at a time.
    """
    if dist.is_available() and dist.is_initialized():
        via_gpu = dist.get_backend() == "nccl"
        for key in sorted(tensors):  # same order on every rank
            t = tensors[key]
            if via_gpu and t.device.type == "cpu":
                on_gpu = t.cuda()
                dist.all_reduce(on_gpu)
                t.copy_(on_gpu.cpu())
            else:
                dist.all_reduce(t)
    return tensors


def layer_of(key: str) -> str:
    """``model.layers.3.attn_in`` -> ``model.layers.3``: statistics are stored per layer."""
    return key.rpartition(".")[0]


def calibrate(trainer: L.Trainer, net, groups: dict[str, list[str]], dataloader,
              config: CalibrationConfig, out: Path | None = None) -> dict | None:
    """``{input key: Σ xᵀx}`` plus ``{input key + '.count': tokens}``, summed over all ranks.

    With ``out``, rank 0 writes each layer's statistics to ``out/stats-<layer>.safetensors`` as
    soon as its pass ends (nothing is returned: read them with ``SafetensorsFolder`` once every
    rank is done); without, they are returned as a dict.
    """
    layers = list(dict.fromkeys(layer_of(key) for key in groups))
    per_pass = config.layers_per_pass or len(layers)
    stats: dict[str, torch.Tensor] = {}
    for start in range(0, len(layers), per_pass):
        chunk = layers[start:start + per_pass]
        module = Calibration(net, {k: v for k, v in groups.items() if layer_of(k) in chunk},
                             config.dtype, config.device, config.product_dtype,
                             config.read_weight)
        with named(trainer, f"calibrate (layers {start + 1}-{start + len(chunk)} of {len(layers)})"):
            trainer.predict(module, dataloaders=dataloader, return_predictions=False)
        for index, layer in enumerate(chunk, start):
            shard = {}
            for key in (k for k in groups if layer_of(k) == layer):
                s = module.sums.pop(key).cpu()
                if not torch.isfinite(s).all():
                    raise SieveError(f"calibration statistics of {key} (input of "
                                     f"{', '.join(groups[key])}) contain NaN/inf; run the model "
                                     f"in float32 (model.dtype) and keep calibration.dtype "
                                     f"float64")
                shard[key] = s
                shard[f"{key}.count"] = torch.tensor(module.counts[key])
            if out is None:
                stats.update(shard)
            elif trainer.is_global_zero:
                save_file(shard, str(Path(out) / f"stats-{index:05d}.safetensors"))
    return stats if out is None else None


class Calibrate(Stage):
    """The statistics of every input group, one safetensors shard per layer (read lazily)."""

    name = "calibrate"

    def __init__(self, ctx: Context, groups: dict[str, list[str]], config: CalibrationConfig,
                 identity: dict):
        self.ctx, self.groups, self.config, self.identity = ctx, groups, config, identity

    def fingerprint(self) -> dict:
        """The model and data (``identity``) and the settings that change the sums: passes and
        where the sums live change nothing, and float32 and float64 products agree to ~1e-6."""
        config = asdict(self.config)
        for setting in ("layers_per_pass", "device", "product_dtype"):
            config.pop(setting)
        return {**self.identity, **config}

    def run(self, work: Path) -> Path:
        trainer = self.ctx.trainer
        shards = work / "stats"
        if trainer.is_global_zero:
            shutil.rmtree(shards, ignore_errors=True)  # a killed pass's leftovers
            shards.mkdir()
        calibrate(trainer, self.ctx.lm.net, self.groups, self.ctx.calibration_loader(),
                  self.config, out=shards)
        return shards

    def save(self, shards: Path, folder: Path) -> None:
        for shard in sorted(shards.glob("stats-*.safetensors")):
            os.replace(shard, folder / shard.name)

    def load(self, folder: Path) -> SafetensorsFolder:
        return SafetensorsFolder(folder)
