"""The linear algebra and sums that pruning units and stages share.

Below every stage and unit (it imports torch only): the sorted, sign-fixed eigendecomposition
every basis and refit slices, the ridge damping every refit pulls towards the dense weights
with, how a second moment is read from calibration's sums, and how sums are added over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


PRODUCT_BLOCK = 1 << 24  # elements of one block of calibration's xᵀx (64 MiB in float32)


def eigh_desc(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues and eigenvectors of a symmetric matrix, largest first; each vector's sign
    set so that its largest entry is positive (eigh's signs are arbitrary: nearly equal inputs,
    on two ranks say, would otherwise give bases that differ by signs)."""
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    vectors = vectors.flip(1)
    peak = vectors.gather(0, vectors.abs().argmax(0, keepdim=True))
    return values.flip(0), vectors * torch.where(peak < 0, -1.0, 1.0).to(vectors.dtype)


def damping(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """``ridge · mean(diag C)``: the refits' pull towards the dense weights, scale-free."""
    return ridge * c.diagonal(dim1=-2, dim2=-1).mean(-1).clamp(min=1e-30)


def damped(c: torch.Tensor, ridge: float) -> torch.Tensor:
    """``C + λI`` with ``λ = ridge · mean(diag C)``: the second moment the refits solve with."""
    out = c.clone()  # (no identity matrix: for an 8B MLP each I × I temporary is 0.8 GB)
    out.diagonal(dim1=-2, dim2=-1).add_(damping(c, ridge)[..., None])
    return out


def all_finite(t: torch.Tensor, block_elements: int = 1 << 22) -> bool:
    """No NaN or inf in ``t``, checked a block at a time: ``torch.isfinite`` of a whole tensor
    makes an ``abs()`` copy of it (2 GB beside one layer's float64 sums of an 8B model)."""
    flat = t.reshape(-1)
    return all(bool(torch.isfinite(flat[i:i + block_elements]).all())
               for i in range(0, flat.numel(), block_elements))


def second_moment(stats, key: str, device=None, dtype: torch.dtype | None = None
                  ) -> torch.Tensor:
    """``E[x xᵀ]`` of input group ``key`` from calibration's sums (``stats[key]``, ``Σ x xᵀ``,
    and ``stats[key + ".count"]``, its tokens), moved and cast before the division."""
    total = stats[key]
    moved = total.to(device, dtype)
    count = max(int(stats[f"{key}.count"]), 1)
    # a copy made by the move is divided in place (one I × I matrix less at the peak)
    return moved / count if moved is total else moved.div_(count)


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
