"""Search: one keep level per pruning unit, as large a cut as validation accuracy allows.

Bisect the uniform keep fraction (accuracy is assumed to fall with it), then seed allocations
for the GA (``genetic.py``): ``sensitivity`` bisects one global price per weight removed along
the path that a per-unit cost estimate orders (``sensitivity.py``); ``kind`` bisects each kind
of unit (MLPs, q, k, v, o…) further, largest first. Candidates are scored by ``fitness.py``.
Here: :func:`search` (resumable from ``uniform.json``) and the bisections it runs.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Callable

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..errors import SieveError
from ..io import read_json, resumable, write_json
from ..models.pruning import Pruner, layer_and_kind
from ..report import save_search
from .fitness import Fitness, Verdict, pool_fitness
from .genetic import GeneticSearch
from .search_config import SearchConfig, SearchResult
from .sensitivity import price_path, sensitivity_costs
from .stage import Context, Searched, Stage, levels_at

__all__ = ["Fitness", "GeneticSearch", "Search", "SearchConfig", "SearchResult", "bisect", "kind_search",
           "kinds_of", "ladder_with", "path_search", "search", "uniform_search"]


STATE_FORMAT = 3  # of the resumable state in uniform.json; raise it when its content changes


class Search(Stage):
    """The levels, chosen on the validation split (statistics for the sensitivity seed)."""

    name = "search"

    def __init__(self, ctx: Context, pruner: Pruner, stats, groups: dict[str, list[str]],
                 config: SearchConfig):
        self.ctx, self.pruner, self.stats, self.groups, self.config = (ctx, pruner, stats,
                                                                        groups, config)

    def fingerprint(self) -> dict:
        data = self.ctx.data
        config = asdict(self.config)
        if config["space"] == "free":  # (runs made before the option still match)
            del config["space"]
        return {"data": data.fingerprint_config("validation"), **config,
                **({"pool": data.pool_fingerprint()} if self.config.fidelity else {})}

    def run(self, work: Path) -> Searched:
        ctx, config = self.ctx, self.config
        fitness = Fitness(ctx.trainer, ctx.lm, self.pruner, ctx.data.val_dataloader(),
                          config.early_reject, config.confidence)
        if config.fidelity:
            fitness.pool = pool_fitness(ctx.trainer, ctx.lm, self.pruner, ctx.data,
                                        config.pool_examples, config.early_reject,
                                        config.confidence)
            fitness.pool_share = config.fidelity  # of (base − target) per prompt
        costs = partial(sensitivity_costs, ctx.trainer, ctx.lm, self.pruner,
                        ctx.calibration_loader(labelled=config.fisher == "label"), self.stats,
                        self.groups, config.ladder, config.fisher)
        return Searched.from_record(search(fitness, self.pruner.names, config, work,
                                           ctx.trainer.is_global_zero, costs).record())

    def save(self, found: Searched, folder: Path) -> None:
        save_search(found.record(), folder)

    def load(self, folder: Path) -> Searched:
        return Searched.from_record(read_json(folder / "search.json"))


def search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
           is_writer: bool = True,
           costs: Callable[[], dict[str, list[dict]]] | None = None) -> SearchResult:
    """Uniform bisection, then (strategy genetic) the seed allocations and the GA seeded with
    them; ``costs`` gives the sensitivity seed's per-unit cost estimates. The result (and its
    price path) goes to confirmation after recovery (``confirm.py``). The model moves from
    candidate to candidate and ends back at dense."""
    try:
        return _search(fitness, names, config, work, is_writer, costs)
    finally:
        fitness.pruner.apply(1.0)


def _search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
            is_writer: bool, costs) -> SearchResult:
    spread = uniform_levels(fitness.pruner, names, config.space)
    uniform_path = work / "uniform.json" if work else None
    saved = resumable(uniform_path, read_json, "searching the uniform level again"
                      ) if uniform_path else None
    if isinstance(saved, dict) and saved.get("format") == STATE_FORMAT:
        uniform = saved
        fitness.restore(uniform["fitness"])
    else:  # (a state written by another version of this code is recomputed, not misread)
        base_scores = fitness.hardest_first("search: base model")
        base_accuracy = sum(base_scores) / fitness.n
        budget = fitness.budget(config.target(base_accuracy))
        slack = budget - Fitness.lost(base_scores)
        if slack < 3:
            rank_zero_warn(
                f"search: epsilon {config.epsilon} allows {slack:.1f} more lost score than the "
                f"base model's on {fitness.n} validation examples; levels chosen on so few errors "
                "fit this split's noise (use more validation examples or a larger epsilon)")
        if config.strategy == "sensitivity":  # the price path alone
            if costs is None:
                raise ValueError("search.strategy sensitivity needs the sensitivity costs")
            uniform = {"base_accuracy": base_accuracy, "target": config.target(base_accuracy),
                       "history": []}
        else:
            judge = _judge(fitness, budget, config.space if config.space == "standard"
                           else "uniform")
            uniform = uniform_search(lambda keep: judge(spread(keep)), base_accuracy, config)
        uniform["seeds"] = {}
        if config.strategy != "uniform":
            if ("sensitivity" in config.seeds or config.strategy == "sensitivity") and costs:
                path = uniform["path"] = price_path(costs())
                uniform["seeds"]["sensitivity"] = path_search(
                    _judge(fitness, budget, "sensitivity seed"), path, names,
                    fitness.pruner.params(1.0)[1], base_accuracy, config)
            if "kind" in config.seeds and config.strategy == "genetic":
                uniform["seeds"]["kind"] = kind_search(_judge(fitness, budget, "kind seed"),
                                                       kinds_of(fitness, names),
                                                       uniform["keep"], uniform["accuracy"],
                                                       config)
        uniform["fitness"], uniform["format"] = fitness.state(), STATE_FORMAT
        if uniform_path and is_writer:
            write_json(uniform_path, uniform)
    uniform_tokens, uniform_evaluations = (uniform["fitness"]["tokens_spent"],
                                           uniform["fitness"]["evaluations"])
    result = {"base_accuracy": uniform["base_accuracy"], "target": uniform["target"],
              "uniform": {k: v for k, v in uniform.items()
                          if k not in ("fitness", "seeds", "format", "path")},
              "path": [list(step) for step in uniform.get("path", [])],
              "seeds": {name: {**seed, "kept": fitness.pruner.params(seed["levels"])[0]}
                        for name, seed in uniform["seeds"].items()},
              "validation_examples": fitness.n, "validation_tokens": fitness.tokens_total}
    cost = {"search_tokens": uniform_tokens, "evaluations": uniform_evaluations,
            "pool_tokens": fitness.pool.tokens_spent if fitness.pool else 0}
    if config.strategy == "uniform":
        levels = spread(uniform["keep"])
        kept, total = fitness.pruner.params(levels)
        return SearchResult(**result, levels=levels, accuracy=uniform["accuracy"], kept=kept,
                            feasible=True, cost=cost)
    if config.strategy == "sensitivity":  # the path's point is the result, not a seed
        path = result["seeds"].pop("sensitivity")
        return SearchResult(**result, levels=path["levels"], accuracy=path["accuracy"],
                            kept=path["kept"], feasible=True, cost=cost, steps=path["steps"],
                            history=path["history"])
    seeds = [seed["levels"] for seed in uniform["seeds"].values()]
    ladder = ladder_with(config.ladder, uniform["keep"],
                         *(keep for levels in seeds for keep in levels.values()))
    ga = GeneticSearch(fitness, names, ladder, uniform["target"], config, work, is_writer)
    found = ga.run([[ladder.index(levels[n]) for n in names] for levels in seeds]
                   + [[ladder.index(uniform["keep"])] * len(names)])
    naive = config.population * (config.generations + 1) * fitness.tokens_total
    cost = {"search_tokens": fitness.tokens_spent, "evaluations": fitness.evaluations,
            "pool_tokens": fitness.pool.tokens_spent if fitness.pool else 0,
            "ga_tokens": fitness.tokens_spent - uniform_tokens,
            "ga_evaluations": fitness.evaluations - uniform_evaluations,
            "uniform_tokens": uniform_tokens, "naive_tokens": naive}
    return SearchResult(**result, **found, ladder=ladder, cost=cost)


def uniform_levels(pruner: Pruner, names: list[str], space: str) -> Callable[[float], dict]:
    """One keep level as every unit's (space free), or as every MLP's with the rest dense
    (standard: equal MLPs keep equal neuron counts, one width the base architecture holds)."""
    if space != "standard":
        return lambda keep: dict.fromkeys(names, keep)
    mlps = {n for n in names if pruner.units[n].kind == "neurons"}
    if not mlps:
        raise SieveError("search.space standard prunes MLP neurons: set projection.mlp neurons")
    return lambda keep: {n: keep if n in mlps else 1.0 for n in names}


def uniform_search(judge: Callable[[float], Verdict], base_accuracy: float,
                   config: SearchConfig) -> dict:
    """Bisection on the uniform keep fraction; returns the level found and every evaluation.

    Only feasibility steers the bisection, so rejected levels are scored only until they
    exceed the error budget (their ``accuracy`` is then unknown: None).
    """
    history = [{"keep": 1.0, "accuracy": base_accuracy, "feasible": True}]

    def feasible(keep: float) -> Verdict:
        verdict = judge(keep)
        history.append({"keep": keep, "accuracy": verdict.accuracy,
                        "feasible": verdict.feasible})
        _progress("uniform", keep, verdict)
        return verdict

    keep, accuracy = bisect(feasible, 1.0, base_accuracy, config)
    return {"keep": keep, "accuracy": accuracy, "target": config.target(base_accuracy),
            "base_accuracy": base_accuracy, "history": history}


def kind_search(judge: Callable[[dict], Verdict], kinds: dict[str, list[str]], keep: float,
                accuracy: float, config: SearchConfig) -> dict:
    """From the uniform level, bisect each kind's keep lower with the other kinds held, in the
    order of ``kinds`` (largest first); every step stays feasible."""
    levels = {n: keep for names in kinds.values() for n in names}
    history = []
    for kind, names in kinds.items():
        def feasible(k: float) -> Verdict:
            verdict = judge({**levels, **dict.fromkeys(names, k)})
            history.append({"kind": kind, "keep": k, "accuracy": verdict.accuracy,
                            "feasible": verdict.feasible})
            _progress(f"by kind, {kind}", k, verdict)
            return verdict

        found, accuracy = bisect(feasible, keep, accuracy, config)
        levels.update(dict.fromkeys(names, found))
    return {"levels": levels, "accuracy": accuracy, "history": history,
            "keeps": {kind: levels[names[0]] for kind, names in kinds.items()}}


def path_search(judge: Callable[[dict], Verdict], path: list[tuple[str, float, int]],
                names: list[str], total: int, accuracy: float, config: SearchConfig) -> dict:
    """The longest feasible prefix of the price path (:func:`~.sensitivity.price_path`),
    bisected on the weights it removes down to ``resolution`` of the total."""
    removed = [0]
    for _, _, weights in path:
        removed.append(removed[-1] + weights)
    history = []

    def feasible(j: int) -> Verdict:
        verdict = judge(levels_at(path, names, j))
        history.append({"step": j, "removed": removed[j] / total,
                        "accuracy": verdict.accuracy, "feasible": verdict.feasible})
        _progress("sensitivity", 1 - removed[j] / total, verdict)
        return verdict

    lo, hi, lo_accuracy = 0, len(path), accuracy
    verdict = feasible(hi)
    if verdict.feasible:
        lo, lo_accuracy = hi, verdict.accuracy
    while hi - lo > 1 and removed[hi] - removed[lo] > config.resolution * total:
        mid = min(bisect_right(removed, (removed[lo] + removed[hi]) / 2, lo + 1, hi), hi - 1)
        verdict = feasible(mid)
        if verdict.feasible:
            lo, lo_accuracy = mid, verdict.accuracy
        else:
            hi = mid
    return {"levels": levels_at(path, names, lo), "accuracy": lo_accuracy, "steps": lo,
            "history": history}


def bisect(feasible: Callable[[float], Verdict], top: float, top_accuracy: float,
           config: SearchConfig) -> tuple[float, float]:
    """Smallest keep in ``[min_keep, top]`` found feasible (``top`` is), and its accuracy."""
    lo, hi, hi_acc = config.min_keep, top, top_accuracy
    verdict = feasible(lo)
    if verdict.feasible:
        return lo, verdict.accuracy
    while hi - lo > config.resolution:
        mid = round((lo + hi) / 2, 6)
        verdict = feasible(mid)
        if verdict.feasible:
            hi, hi_acc = mid, verdict.accuracy
        else:
            lo = mid
    return hi, hi_acc


def _judge(fitness: Fitness, budget: float, what: str) -> Callable[[dict | float], Verdict]:
    """``fitness.judge`` at this budget, its progress bar named after the bisection."""
    def judge(levels):
        return fitness.judge(levels, budget, label=f"search: {what}")
    return judge


def _progress(what: str, keep: float, verdict: Verdict) -> None:
    """One line per bisection step: these take minutes on a CPU and have no natural bar."""
    accuracy = "" if verdict.accuracy is None else f", accuracy {verdict.accuracy:.4f}"
    rank_zero_info(f"[sieve-pl] search ({what}): keep {keep:.4f} "
                   f"{'feasible' if verdict.feasible else 'rejected'}{accuracy}")


def kinds_of(fitness: Fitness, names: list[str]) -> dict[str, list[str]]:
    """Units grouped by kind, the kind holding the most weights first."""
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(layer_and_kind(name)[1], []).append(name)
    units = fitness.pruner.units
    return dict(sorted(kinds.items(), key=lambda kv: -sum(units[n].total for n in kv[1])))


def ladder_with(ladder: list[float], *keeps: float) -> list[float]:
    """The ladder, descending, with the seeds' levels added as rungs of their own."""
    return sorted(set(ladder) | {1.0, *keeps}, reverse=True)
