"""Confirmation: the search's levels checked once on a labelled split that no selection read.

The search keeps the largest cut that passes a bound on the very examples it selects on, so its
winner is optimistic (a winner's curse: ``bench/selection_bias.py`` simulates it). The
confirmation split is scored once, with a stricter bound (``search.confirm``, z = 2 by
default): lost score plus ``z·sqrt(Σ(s_base − s)²)`` within the budget of ε on this split's own
base accuracy. A cut that fails steps back toward dense — along the sensitivity price path when
the search has one (the most expensive cuts per weight are undone first), else by bringing
every unit's keep towards 1 — to the deepest point that passes (bisected).
"""
from __future__ import annotations

from typing import Callable

from lightning.pytorch.utilities import rank_zero_info

from .fitness import Fitness
from .sensitivity import levels_at


def confirm(fitness: Fitness, levels: dict[str, float], names: list[str], config,
            path: list | None = None) -> dict:
    """The confirmed levels (``levels`` itself when it passes), its confirmation accuracy,
    the split's base accuracy and every point tried."""
    fitness.label = "search: confirmation"
    base = sum(fitness.hardest_first()) / fitness.n
    budget = fitness.budget(config.target(base))
    history = []

    def judged(point: dict[str, float], step) -> dict:
        verdict = fitness.judge(point, budget)
        history.append({"step": step, "feasible": verdict["feasible"],
                        "accuracy": verdict["accuracy"],
                        "kept": fitness.pruner.params(point)[0]})
        rank_zero_info(f"[sieve-pl] search (confirmation): step back {step}: "
                       f"{'passes' if verdict['feasible'] else 'fails'}")
        return verdict

    first = judged(levels, 0)
    if first["feasible"]:
        return {"levels": levels, "accuracy": first["accuracy"], "base_accuracy": base,
                "passed": True, "history": history, "examples": fitness.n}
    if path:  # undo the path's steps from its most expensive end
        steps = len(path)
        back: Callable[[int], dict] = lambda j: {  # noqa: E731
            n: max(levels[n], keep) for n, keep in levels_at(path, names, steps - j).items()}
        lo, hi = steps, 0  # lo: passes (every cut undone), hi: fails
        while lo - hi > 1:
            mid = (lo + hi) // 2
            if judged(back(mid), mid)["feasible"]:
                lo = mid
            else:
                hi = mid
        final = back(lo)
    else:  # every unit's cut scaled towards none
        shrink: Callable[[float], dict] = lambda t: {  # noqa: E731
            n: 1 - (1 - keep) * t for n, keep in levels.items()}
        lo, hi = 0.0, 1.0  # lo: passes (dense), hi: fails
        while hi - lo > config.resolution:
            mid = round((lo + hi) / 2, 6)
            if judged(shrink(mid), 1 - mid)["feasible"]:
                lo = mid
            else:
                hi = mid
        final = shrink(lo)
    verdict = fitness.judge(final, budget)
    return {"levels": final, "accuracy": verdict["accuracy"], "base_accuracy": base,
            "passed": False, "history": history, "examples": fitness.n}
