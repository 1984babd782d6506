"""Confirmation: the deliverable checked on a labelled split that no selection read.

The search keeps the largest cut that passes a bound on the very examples it selects on, so its
winner is optimistic (a winner's curse: ``bench/selection_bias.py`` simulates it). After
recovery, the model the user gets — the search's levels, with recovery's LoRA when it raises
confirmation accuracy beyond the noise (``Recovered.keeps``: :func:`lora_gate`) — is scored on the confirmation
split (the other of the two when it fails there), with a stricter bound
(``search.confirm``, z = 2 by default): lost score plus ``z·sqrt(Σ(s_base − s)²)`` within the
budget of ε on this split's own base accuracy. One that fails steps back toward dense — along
the sensitivity price path when the search has one (the most expensive cuts per weight are
undone first), else by bringing every unit's keep towards 1 — to the deepest point that passes
(bisected). The step back scores the recovered model: a unit stepped back loses its LoRA
(trained for its old size), every other unit keeps it, so no step needs another recovery; at
the levels it ends on, LoRA is kept unless the same levels score higher without it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from lightning.pytorch.utilities import rank_zero_info

from ..io import read_json, write_json
from .fitness import Fitness, Verdict
from .search_config import SearchConfig
from .stage import Confirmed, Context, Recovered, Searched, Stage, levels_at


class Confirm(Stage):
    """The exported levels and whether LoRA goes with them, confirmed when the run has a
    confirmation split (and ``search.confirm`` > 0); without one, the search's levels and
    recovery's own decision on validation."""

    name = "confirm"
    format = 2  # the step back scores the levels with recovery's LoRA where it fits

    def __init__(self, ctx: Context, pruner, found: Searched, recovered: Recovered,
                 accuracy: float, config: SearchConfig, keep_z: float = 0.0):
        self.ctx, self.pruner, self.found, self.recovered = ctx, pruner, found, recovered
        self.accuracy, self.config, self.keep_z = accuracy, config, keep_z

    def confirms(self) -> bool:
        return len(self.ctx.data.splits.get("confirmation", ())) > 0 and self.config.confirm > 0

    def fingerprint(self) -> dict:
        c = self.config
        if not self.confirms():
            return {"confirm": False}
        return {"data": self.ctx.data.fingerprint_config("confirmation"), "confirm": c.confirm,
                "epsilon": c.epsilon, "relative": c.relative, "resolution": c.resolution,
                "early_reject": c.early_reject,
                **({"keep_z": self.keep_z} if self.keep_z and self.recovered.weights else {})}

    def run(self, work: Path) -> Confirmed:
        ctx, pruner, found, config = self.ctx, self.pruner, self.found, self.config
        weights = self.recovered.weights
        lora = self.recovered.keeps(self.accuracy, self.keep_z)
        if not self.confirms():
            return Confirmed(found.levels, lora)
        fitness = Fitness(ctx.trainer, ctx.lm, pruner, ctx.data.confirmation_dataloader(),
                          config.early_reject, config.confirm)
        gate = self.recovered.gate(self.keep_z) if weights else None
        fitness.weights = weights if lora else {}
        try:  # stepping back, the recovered model (what will be exported) is scored
            checked = confirm(fitness, found.levels, pruner.names, config,
                              found.details.get("path"), weights,
                              other=({} if lora else weights) if weights else None)
            checked["with_lora"] = bool(fitness.weights)
            if gate is not None:
                checked["lora_gate"] = gate
            if fitness.weights and not checked["passed"]:  # LoRA must not lower it there
                fitness.weights = {}
                checked["without_lora"] = fitness.accuracy(checked["levels"],
                                                            "confirm: without LoRA")
                lora = checked["accuracy"] >= checked["without_lora"] - 1e-6
        finally:
            pruner.apply(1.0)
        levels = checked.pop("levels")
        lora = checked["with_lora"] if checked["passed"] else lora
        return Confirmed(levels, lora, {**checked, "kept": pruner.params(levels)[0],
                                        "searched_kept": pruner.params(found.levels)[0]})

    def save(self, result: Confirmed, folder: Path) -> None:
        write_json(folder / "confirm.json", result.record())

    def load(self, folder: Path) -> Confirmed:
        return Confirmed.from_record(read_json(folder / "confirm.json"))


def confirm(fitness: Fitness, levels: dict[str, float], names: list[str], config,
            path: list | None = None, step_weights: dict | None = None,
            other: dict | None = None) -> dict:
    """The confirmed levels (``levels`` itself when it passes), its confirmation accuracy,
    the split's base accuracy and every point tried (each with ``fitness.weights`` where they
    fit; the step back with ``step_weights`` when given: recovery that lowered confirmation
    at the search's levels may still raise it at levels it steps back to). ``other``: weights
    tried at ``levels`` when ``fitness.weights`` fail there, before any step back (LoRA the
    gate left out may be what passes; ``fitness.weights`` ends as those that passed)."""
    base = sum(fitness.hardest_first("confirm")) / fitness.n
    budget = fitness.budget(config.target(base))
    history = []

    def judged(point: dict[str, float], step) -> Verdict:
        verdict = fitness.judge(point, budget, label="confirm")
        history.append({"step": step, "feasible": verdict.feasible,
                        "accuracy": verdict.accuracy,
                        "kept": fitness.pruner.params(point)[0]})
        rank_zero_info(f"[sieve-pl] confirm: step back {step}: "
                       f"{'passes' if verdict.feasible else 'fails'}")
        return verdict

    first = judged(levels, 0)
    if not first.feasible and other is not None:
        preferred, fitness.weights = fitness.weights, other
        first = judged(levels, 0)
        if not first.feasible:
            fitness.weights = preferred
    if first.feasible:
        return {"levels": levels, "accuracy": first.accuracy, "base_accuracy": base,
                "passed": True, "history": history, "examples": fitness.n}
    if step_weights is not None:
        fitness.weights = step_weights
    if path:  # undo the path's steps from its most expensive end
        steps = len(path)
        back: Callable[[int], dict] = lambda j: {  # noqa: E731
            n: max(levels[n], keep) for n, keep in levels_at(path, names, steps - j).items()}
        lo, hi = steps, 0  # lo: passes (every cut undone), hi: fails
        while lo - hi > 1:
            mid = (lo + hi) // 2
            if judged(back(mid), mid).feasible:
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
            if judged(shrink(mid), 1 - mid).feasible:
                lo = mid
            else:
                hi = mid
        final = shrink(lo)
    verdict = fitness.judge(final, budget, label="confirm")
    return {"levels": final, "accuracy": verdict.accuracy, "base_accuracy": base,
            "passed": False, "history": history, "examples": fitness.n}
