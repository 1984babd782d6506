"""Search for keep levels: for now the largest uniform pruning level within tolerance.

Accuracy is assumed to fall as the keep fraction falls, so bisection over ``p`` finds the smallest
uniform keep fraction whose validation accuracy stays ≥ the target.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..errors import SieveError


@dataclass
class SearchConfig:
    """How much accuracy may be lost, and how finely the level is searched.

    Args:
        epsilon: allowed accuracy loss, in (0, 1).
        relative: true: target is (1 - epsilon) * base accuracy; false: base accuracy - epsilon.
        resolution: bisection stops when the keep interval is narrower than this.
        min_keep: smallest keep fraction tried.
    """

    epsilon: float = 0.05
    relative: bool = True
    resolution: float = 0.01
    min_keep: float = 0.05

    def check(self) -> None:
        if not 0 < self.epsilon < 1:
            raise SieveError(f"search.epsilon must be in (0, 1), got {self.epsilon}")
        if not 0 < self.min_keep < 1:
            raise SieveError(f"search.min_keep must be in (0, 1), got {self.min_keep}")
        if not 0 < self.resolution < 1:
            raise SieveError(f"search.resolution must be in (0, 1), got {self.resolution}")

    def target(self, base_accuracy: float) -> float:
        return (base_accuracy * (1 - self.epsilon) if self.relative
                else base_accuracy - self.epsilon)


def uniform_search(accuracy: Callable[[float], float], base_accuracy: float,
                   config: SearchConfig) -> dict:
    """Bisection on the uniform keep fraction; returns the level found and every evaluation."""
    target = config.target(base_accuracy)
    history = [{"keep": 1.0, "accuracy": base_accuracy}]
    lo, hi, hi_acc = config.min_keep, 1.0, base_accuracy
    acc = accuracy(lo)
    history.append({"keep": lo, "accuracy": acc})
    if acc >= target:
        hi, hi_acc = lo, acc
    while hi - lo > config.resolution and hi > config.min_keep:
        mid = round((lo + hi) / 2, 6)
        acc = accuracy(mid)
        history.append({"keep": mid, "accuracy": acc})
        if acc >= target:
            hi, hi_acc = mid, acc
        else:
            lo = mid
    return {"keep": hi, "accuracy": hi_acc, "target": target, "base_accuracy": base_accuracy,
            "history": history}
