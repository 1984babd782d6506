"""Calibration: second moments ``Σ xᵀx`` of every distinct target-Linear input over task tokens.

Layer by layer (``models/sequential.py``): a predict loop of the CLI's Trainer captures, for each
calibration batch of this rank, the hidden states entering the first decoder layer and how every
layer is called; then each decoder layer in turn goes to the accelerator, every batch runs
through it (its output becomes the next layer's input), and forward hooks on the first Linear of
each input group add the non-padding tokens' ``xᵀx`` into one sum per group. The layer's sums
are all-reduced over ranks and written before the next layer starts, so accelerator memory holds
one layer, its sums and one batch, whatever the depth, and the model waits in host memory.
Sums (not means) plus token counts are kept so ranks reduce them exactly.
"""
from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

import lightning as L
import torch

from ..artifacts import save_tensors
from ..errors import SieveError
from ..io import SafetensorsFolder, atomic, crash_point
from ..maths import PRODUCT_BLOCK, all_finite, reduce_sums
from ..models.factored import dense_shape
from ..models.hooks import Capture
from ..models.sequential import capture, layer_by_layer
from ..progress import named, quiet
from .stage import Context, Stage


@dataclass
class CalibrationConfig:
    """Calibration statistics.

    Args:
        dtype: accumulator dtype of the Σ xᵀx sums (float64: no drift over millions of tokens;
            float32 halves their memory and disk).
        device: where one layer's sums live while it runs: auto (the accelerator) or cpu (each
            batch's xᵀx is computed on the accelerator and added to a sum in host memory, for
            the largest layers on the smallest accelerators).
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
        pool: prompts from outside the task's own data (``data.pool``'s sister datasets and
            unlabeled text; never a row the validation, confirmation, test or cross-dataset
            splits hold) added to the calibration examples, spread over them: statistics (and
            the sensitivity seed's model Fisher, which needs no labels) that see the sister
            datasets too, so projections keep what they need. 0: the calibration split only.
    """

    dtype: str = "float64"
    device: Literal["auto", "cpu"] = "auto"
    product_dtype: Literal["float32", "float64"] = "float32"
    examples: int = 0
    read_weight: int = 1
    pool: int = 0

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "float64"):
            raise SieveError(f"calibration.dtype must be float32 or float64, got {self.dtype!r}")
        if self.examples < 0 or self.read_weight < 1 or self.pool < 0:
            raise SieveError("calibration needs examples >= 0, read_weight >= 1 and pool >= 0, "
                             f"got {self.examples}, {self.read_weight}, {self.pool}")


class Batches(L.LightningModule):
    """A predict loop that only collects this rank's calibration batches (Lightning launches
    the DDP processes and shares the batches out, none repeated); they are run layer by layer
    afterwards, outside its inference mode, so modules can move."""

    def __init__(self):
        super().__init__()
        self.batches = []

    def predict_step(self, batch, batch_idx):
        self.batches.append({k: v.cpu() if torch.is_tensor(v) else v for k, v in batch.items()})


class Sums:
    """Forward pre-hooks adding each group's ``xᵀx`` (non-padding tokens) into a sum."""

    def __init__(self, modules: dict[str, torch.nn.Module], config: CalibrationConfig,
                 device: torch.device):
        self.sum_dtype = getattr(torch, config.dtype)
        # never below float32, never above the accumulator
        self.product_dtype = (torch.float64 if config.product_dtype == "float64"
                              and self.sum_dtype == torch.float64 else torch.float32)
        self.read_weight = config.read_weight
        where = torch.device("cpu") if config.device == "cpu" else device
        self.sums = {key: torch.zeros((dense_shape(m)[1],) * 2, dtype=self.sum_dtype,
                                      device=where) for key, m in modules.items()}
        self.counts = dict.fromkeys(modules, 0)
        self.mask = None
        self.capture = Capture(modules, self._add)

    def _add(self, key: str, inputs: torch.Tensor) -> None:
        x = inputs[self.mask.to(inputs.device)].to(self.product_dtype)
        accumulate(self.sums[key], x)
        n = x.shape[0]
        if self.read_weight > 1:  # left padding: the last position is every row's own
            last, extra = inputs[:, -1].to(self.product_dtype), self.read_weight - 1
            accumulate(self.sums[key], last, extra)
            n += extra * last.shape[0]
        self.counts[key] += n

    def remove(self) -> dict[str, torch.Tensor]:
        """Remove the hooks; the sums and counts, reduced over ranks, on the host."""
        self.capture.remove()
        reduce_sums(self.sums)
        device = next(iter(self.sums.values())).device
        counts = reduce_sums({k: torch.tensor(n, device=device) for k, n in self.counts.items()})
        out = {}
        for key, s in self.sums.items():
            out[key] = s.cpu()
            out[f"{key}.count"] = counts[key].cpu()
        # the caller owns them now: a reference left here (the hooks' bound method and this
        # object form a cycle that only the garbage collector frees) would keep one layer's
        # sums alive beside the next layer's
        self.sums, self.capture = {}, None
        return out


def accumulate(total: torch.Tensor, x: torch.Tensor, scale: float = 1.0,
               block_elements: int = PRODUCT_BLOCK) -> None:
    """``total += scale · xᵀx``, a block of columns at a time: neither the I × I product nor
    its cast to the sum's dtype ever exists whole (1.6 GB each for an 8B model's MLP input)."""
    width = x.shape[1]
    block = max(1, min(width, block_elements // width))
    for j in range(0, width, block):
        product = x.T @ x[:, j:j + block]
        total[:, j:j + block].add_(product.to(total.device), alpha=scale)


def layer_of(key: str) -> str:
    """``model.layers.3.attn_in`` -> ``model.layers.3``: statistics are stored per layer."""
    return key.rpartition(".")[0]


def calibrate(trainer: L.Trainer, net, groups: dict[str, list[str]], dataloader,
              config: CalibrationConfig, out: Path | None = None) -> dict | None:
    """``{input key: Σ xᵀx}`` plus ``{input key + '.count': tokens}``, summed over all ranks.

    With ``out``, rank 0 writes each layer's statistics to ``out/stats-<layer>.safetensors`` as
    soon as the layer is done (nothing is returned: read them with ``SafetensorsFolder`` once
    every rank is done); without, they are returned as a dict.
    """
    layers = layer_of(layer_of(next(iter(groups))))  # model.layers.0.attn_in -> model.layers
    keys_of: dict[int, list[str]] = {}
    for key in groups:
        keys_of.setdefault(int(layer_of(key).rpartition(".")[2]), []).append(key)
    device = trainer.strategy.root_device
    mine = Batches()
    with named(trainer, "calibrate: batches"):
        trainer.predict(mine, dataloaders=dataloader, return_predictions=False)
    batches = capture(net, layers, mine.batches, device)
    stats: dict[str, torch.Tensor] = {}

    @contextmanager
    def statistics(index: int, layer):
        keys = keys_of.get(index, [])
        sums = Sums({key: net.get_submodule(groups[key][0]) for key in keys}, config, device)
        def starts(batch):  # the hooks keep this batch's non-padding tokens
            sums.mask = batch.mask
        yield starts
        shard = sums.remove()
        for key in keys:
            if not all_finite(shard[key]):
                raise SieveError(f"calibration statistics of {key} (input of "
                                 f"{', '.join(groups[key])}) contain NaN/inf; run the model "
                                 f"in float32 (model.dtype) and keep calibration.dtype float64")
        if out is None:
            stats.update(shard)
        elif trainer.is_global_zero:
            with atomic(Path(out) / f"stats-{index:05d}.safetensors") as tmp:
                save_tensors(shard, tmp)
        crash_point("calibrate:layer")

    layer_by_layer(net, layers, batches, device, statistics, desc="calibrate",
                   bars=not quiet(trainer))
    return stats if out is None else None


class Calibrate(Stage):
    """The statistics of every input group, one safetensors shard per layer (read lazily)."""

    name = "calibrate"

    def __init__(self, ctx: Context, groups: dict[str, list[str]], config: CalibrationConfig,
                 identity: dict):
        self.ctx, self.groups, self.config, self.identity = ctx, groups, config, identity

    def fingerprint(self) -> dict:
        """The model and data (``identity``) and the settings that change the sums: where the
        sums live changes nothing, and float32 and float64 products agree to ~1e-6."""
        config = asdict(self.config)
        for setting in ("device", "product_dtype"):
            config.pop(setting)
        if config.pop("pool"):  # (0 adds nothing: runs made before the option still match)
            config["pool"] = {"prompts": self.config.pool,
                              "data": self.ctx.data.pool_fingerprint()}
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
