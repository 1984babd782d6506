"""Search: one keep level per pruning unit, as large a cut as validation accuracy allows.

Bisect the uniform keep fraction (accuracy is assumed to fall with it), then seed allocations
for the GA (``genetic.py``): ``sensitivity`` bisects one global price per weight removed along
the path that a per-unit cost estimate orders (``sensitivity.py``); ``kind`` bisects each kind
of unit (MLPs, q, k, v, o…) further, largest first. Candidates are scored by ``fitness.py``.
Here: the config, :func:`search` (resumable from ``uniform.json``) and the bisections it runs.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from ..errors import SieveError
from ..io import read_json, resumable, write_json
from ..models.pruning import Pruner, layer_and_kind
from ..report import save_search
from .fitness import Fitness, pool_fitness
from .genetic import GeneticSearch
from .sensitivity import levels_at, price_path, sensitivity_costs
from .stage import Context, Searched, Stage

__all__ = ["Fitness", "GeneticSearch", "Search", "SearchConfig", "bisect", "kind_search",
           "kinds_of", "ladder_with", "path_search", "search", "uniform_search"]


@dataclass
class SearchConfig:
    """How much accuracy may be lost, and how the keep levels are searched.

    Args:
        strategy: genetic (one level per unit, a GA seeded by the uniform level and the seeds),
            sensitivity (the sensitivity price path alone: the longest prefix within epsilon;
            no uniform bisection, no GA: cheaper, and on the demo the GA's levels removed
            little more than the path's) or uniform only.
        epsilon: allowed accuracy loss, in (0, 1).
        relative: true: target is (1 - epsilon) * base accuracy; false: base accuracy - epsilon.
        ladder: keep fractions (of its weights) a unit may take, each in (0, 1]; 1 keeps it
            dense. The smallest rung is as deep as the seeds and the GA cut any unit (the
            uniform level may go lower): validation does not show what very deep cuts of single
            units cost (on the demo the GA's levels with rungs down to 0.1 put some units at 0.3
            and fell 2 points more on test than with rungs down to 0.4, for 0.5% more weights).
        population: genomes per generation.
        generations: generations after the initial population.
        crossover_prob: probability that a pair of parents is crossed over (two-point).
        mutation_prob: probability that a child is mutated.
        gene_mutation_prob: per-gene probability of a ±1 ladder step in a mutated child.
        tournament_size: genomes per selection tournament.
        elite: best genomes copied unchanged into the next generation.
        seed: seed of the search's random choices.
        early_reject: stop scoring a candidate once its errors exceed the tolerance budget.
        screen: share of the validation split (its hardest examples) a genome must pass to win
            a tournament; the elite and the result are always scored on the whole split, so
            the levels found are within epsilon exactly. 1 = every comparison on the whole split
            (then the GA takes exactly the decisions of one that scores every genome). On the
            demo 0.25 found the same levels as 1 for 27% instead of 38% of a naive GA's tokens.
        resolution: uniform bisection stops when the keep interval is narrower than this.
        min_keep: smallest uniform keep fraction tried.
        rank_multiple: round every factored rank down to a multiple of this (32 or 64 suit GPU
            kernels and bitsandbytes' CPU nf4 kernel; 1 = exact keep fractions).
        seeds: allocations bisected after the uniform level to seed the GA (and reported
            beside it). sensitivity: units ordered by their estimated cost per weight removed
            (K-FAC: one backward pass over the calibration split), one global threshold
            bisected against epsilon (about 7 evaluations). kind: each kind of unit bisected
            further, largest kind first, the others held (one bisection per kind: about 5x the
            evaluations). Default sensitivity: a fifth of the kind seed's evaluations, and it
            prices units by what a cut changes in the model's answers rather than by their
            kind (bench/README, "Refits damped towards the dense weights", has the older
            test-split comparison that first suggested it).
        confidence: z of a one-sided bound on the accuracy change: a candidate is feasible when
            its lost score plus ``confidence·sqrt(Σ (s_base − s)²)`` stays within the budget.
            The root term is the noise of the paired difference (for 0/1 scores: the square
            root of the examples it answers differently from the base model), so a candidate
            that breaks many examples and is rescued by lucky fixes — one that holds epsilon on
            this split only — is refused. 0 = the plain accuracy constraint.
        fidelity: the share of epsilon's allowed loss that the unlabeled pool's estimated
            loss may take (``data.pool``: calibration and train prompts, sister datasets; no
            labels; 0 = no pool check). Each pool prompt whose answer changes costs the dense
            model's own probability of its answer minus that of the new one (a near tie
            nothing, a confident answer one example): the expected accuracy loss if the dense
            model's probabilities are calibrated. It is bounded like validation's lost score
            (plus ``confidence·sqrt(Σ cost²)``), within ``fidelity·(base − target)`` per
            prompt, base and target from validation. A candidate must hold both: the pool is
            larger than the labelled split and spans the sister datasets, so a cut that only
            holds on the validation examples is refused.
        pool_examples: pool prompts the fidelity check scores, spread over the pool (0: all).
        confirm: z of the confirmation check (``data.sizes.confirmation`` examples, read by
            nothing else; the confirm stage, after recovery): the deliverable — the search's
            levels with recovery's LoRA when it is exported — must keep its lost score plus
            ``confirm·sqrt(changed answers)`` within epsilon of the base model on that split,
            else the levels step back toward dense along the price path until it does (z >= 2:
            bench/selection_bias.py simulates why the validation bound alone is optimistic).
        fisher: the sensitivity seed's gradients: model (the Fisher of the model's own answer
            distribution: what a cut changes in its answers, whatever the labels) or label
            (the label loss's, the empirical Fisher).
        space: free (every unit its own level) or standard (shapes the base architecture
            holds: one MLP width in every layer, attention untouched, as Minitron ships;
            with strategy uniform and neuron MLPs; ``export.formats`` standard writes it as
            the base architecture, loadable by any engine).
    """

    strategy: Literal["genetic", "sensitivity", "uniform"] = "genetic"
    epsilon: float = 0.05
    relative: bool = True
    ladder: list[float] = field(
        default_factory=lambda: [1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    population: int = 16
    generations: int = 10
    crossover_prob: float = 0.7
    mutation_prob: float = 0.5
    gene_mutation_prob: float = 0.05
    tournament_size: int = 3
    elite: int = 2
    seed: int = 0
    early_reject: bool = True
    screen: float = 0.25
    resolution: float = 0.01
    min_keep: float = 0.05
    rank_multiple: int = 1
    seeds: list[Literal["sensitivity", "kind"]] = field(default_factory=lambda: ["sensitivity"])
    confidence: float = 1.0
    fidelity: float = 0.0
    pool_examples: int = 0
    confirm: float = 2.0
    fisher: Literal["model", "label"] = "model"
    space: Literal["free", "standard"] = "free"

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    def check(self) -> None:
        if not 0 < self.epsilon < 1:
            raise SieveError(f"search.epsilon must be in (0, 1), got {self.epsilon}")
        if not 0 < self.min_keep < 1:
            raise SieveError(f"search.min_keep must be in (0, 1), got {self.min_keep}")
        if not 0 < self.screen <= 1:
            raise SieveError(f"search.screen must be in (0, 1], got {self.screen}")
        if not 0 < self.resolution < 1:
            raise SieveError(f"search.resolution must be in (0, 1), got {self.resolution}")
        if not self.ladder or any(not 0 < p <= 1 for p in self.ladder):
            raise SieveError(f"search.ladder values must be in (0, 1], got {self.ladder}")
        if self.confidence < 0:
            raise SieveError(f"search.confidence must be >= 0, got {self.confidence}")
        if self.confirm < 0:
            raise SieveError(f"search.confirm must be >= 0, got {self.confirm}")
        if self.fidelity < 0 or self.pool_examples < 0:
            raise SieveError(f"search.fidelity and search.pool_examples must be >= 0, got "
                             f"{self.fidelity}, {self.pool_examples}")
        for name in ("crossover_prob", "mutation_prob", "gene_mutation_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise SieveError(f"search.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.tournament_size < 1:
            raise SieveError(f"search.tournament_size must be >= 1, got {self.tournament_size}")
        if self.rank_multiple < 1:
            raise SieveError(f"search.rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.space == "standard" and self.strategy != "uniform":
            raise SieveError("search.space standard searches one MLP width for every layer: "
                             f"set search.strategy uniform (got {self.strategy})")
        if self.population < 2 or self.generations < 0 or not 0 <= self.elite < self.population:
            raise SieveError("search needs population >= 2, generations >= 0 and "
                             "0 <= elite < population")

    def target(self, base_accuracy: float) -> float:
        return (base_accuracy * (1 - self.epsilon) if self.relative
                else base_accuracy - self.epsilon)


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
                                           ctx.trainer.is_global_zero, costs))

    def save(self, found: Searched, folder: Path) -> None:
        save_search(found.record(), folder)

    def load(self, folder: Path) -> Searched:
        return Searched.from_record(read_json(folder / "search.json"))


def search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
           is_writer: bool = True,
           costs: Callable[[], dict[str, list[dict]]] | None = None) -> dict:
    """Uniform bisection, then (strategy genetic) the seed allocations and the GA seeded with
    them; ``costs`` gives the sensitivity seed's per-unit cost estimates. The result (and its
    price path) goes to confirmation after recovery (``confirm.py``). The model moves from
    candidate to candidate and ends back at dense."""
    try:
        return _search(fitness, names, config, work, is_writer, costs)
    finally:
        fitness.pruner.apply(1.0)


def _search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
            is_writer: bool, costs) -> dict:
    spread = uniform_levels(fitness.pruner, names, config.space)
    uniform_path = work / "uniform.json" if work else None
    saved = resumable(uniform_path, read_json, "searching the uniform level again"
                      ) if uniform_path else None
    if isinstance(saved, dict) and saved.get("format") == STATE_FORMAT:
        uniform = saved
        fitness.restore(uniform["fitness"])
    else:  # (a state written by another version of this code is recomputed, not misread)
        fitness.label = "search: base model"
        base_scores = fitness.hardest_first()
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
        return {**result, "levels": levels,
                "accuracy": uniform["accuracy"], "kept": kept, "feasible": True, "cost": cost}
    if config.strategy == "sensitivity":  # the path's point is the result, not a seed
        path = result["seeds"].pop("sensitivity")
        return {**result, "levels": path["levels"], "accuracy": path["accuracy"],
                "kept": path["kept"], "feasible": True, "cost": cost,
                "steps": path["steps"], "history": path["history"]}
    seeds = [seed["levels"] for seed in uniform["seeds"].values()]
    ladder = ladder_with(config.ladder, uniform["keep"],
                         *(keep for levels in seeds for keep in levels.values()))
    ga = GeneticSearch(fitness, names, ladder, uniform["target"], config, work, is_writer)
    found = ga.run([[ladder.index(levels[n]) for n in names] for levels in seeds]
                   + [[ladder.index(uniform["keep"])] * len(names)])
    naive = config.population * (config.generations + 1) * fitness.tokens_total
    return {**result, **found, "ladder": ladder,
            "cost": {"search_tokens": fitness.tokens_spent, "evaluations": fitness.evaluations,
                     "pool_tokens": fitness.pool.tokens_spent if fitness.pool else 0,
                     "ga_tokens": fitness.tokens_spent - uniform_tokens,
                     "ga_evaluations": fitness.evaluations - uniform_evaluations,
                     "uniform_tokens": uniform_tokens, "naive_tokens": naive}}


def uniform_levels(pruner: Pruner, names: list[str], space: str) -> Callable[[float], dict]:
    """One keep level as every unit's (space free), or as every MLP's with the rest dense
    (standard: equal MLPs keep equal neuron counts, one width the base architecture holds)."""
    if space != "standard":
        return lambda keep: dict.fromkeys(names, keep)
    mlps = {n for n in names if pruner.units[n].kind == "neurons"}
    if not mlps:
        raise SieveError("search.space standard prunes MLP neurons: set projection.mlp neurons")
    return lambda keep: {n: keep if n in mlps else 1.0 for n in names}


def uniform_search(judge: Callable[[float], dict], base_accuracy: float,
                   config: SearchConfig) -> dict:
    """Bisection on the uniform keep fraction; returns the level found and every evaluation.

    Only feasibility steers the bisection, so rejected levels are scored only until they
    exceed the error budget (their ``accuracy`` is then unknown: None).
    """
    history = [{"keep": 1.0, "accuracy": base_accuracy, "feasible": True}]

    def feasible(keep: float) -> dict:
        verdict = judge(keep)
        history.append({"keep": keep, "accuracy": verdict["accuracy"],
                        "feasible": verdict["feasible"]})
        _progress("uniform", keep, verdict)
        return verdict

    keep, accuracy = bisect(feasible, 1.0, base_accuracy, config)
    return {"keep": keep, "accuracy": accuracy, "target": config.target(base_accuracy),
            "base_accuracy": base_accuracy, "history": history}


def kind_search(judge: Callable[[dict], dict], kinds: dict[str, list[str]], keep: float,
                accuracy: float, config: SearchConfig) -> dict:
    """From the uniform level, bisect each kind's keep lower with the other kinds held, in the
    order of ``kinds`` (largest first); every step stays feasible."""
    levels = {n: keep for names in kinds.values() for n in names}
    history = []
    for kind, names in kinds.items():
        def feasible(k: float) -> dict:
            verdict = judge({**levels, **dict.fromkeys(names, k)})
            history.append({"kind": kind, "keep": k, "accuracy": verdict["accuracy"],
                            "feasible": verdict["feasible"]})
            _progress(f"by kind, {kind}", k, verdict)
            return verdict

        found, accuracy = bisect(feasible, keep, accuracy, config)
        levels.update(dict.fromkeys(names, found))
    return {"levels": levels, "accuracy": accuracy, "history": history,
            "keeps": {kind: levels[names[0]] for kind, names in kinds.items()}}


def path_search(judge: Callable[[dict], dict], path: list[tuple[str, float, int]],
                names: list[str], total: int, accuracy: float, config: SearchConfig) -> dict:
    """The longest feasible prefix of the price path (:func:`~.sensitivity.price_path`),
    bisected on the weights it removes down to ``resolution`` of the total."""
    removed = [0]
    for _, _, weights in path:
        removed.append(removed[-1] + weights)
    history = []

    def feasible(j: int) -> dict:
        verdict = judge(levels_at(path, names, j))
        history.append({"step": j, "removed": removed[j] / total,
                        "accuracy": verdict["accuracy"], "feasible": verdict["feasible"]})
        _progress("sensitivity", 1 - removed[j] / total, verdict)
        return verdict

    lo, hi, lo_accuracy = 0, len(path), accuracy
    verdict = feasible(hi)
    if verdict["feasible"]:
        lo, lo_accuracy = hi, verdict["accuracy"]
    while hi - lo > 1 and removed[hi] - removed[lo] > config.resolution * total:
        mid = min(bisect_right(removed, (removed[lo] + removed[hi]) / 2, lo + 1, hi), hi - 1)
        verdict = feasible(mid)
        if verdict["feasible"]:
            lo, lo_accuracy = mid, verdict["accuracy"]
        else:
            hi = mid
    return {"levels": levels_at(path, names, lo), "accuracy": lo_accuracy, "steps": lo,
            "history": history}


def bisect(feasible: Callable[[float], dict], top: float, top_accuracy: float,
           config: SearchConfig) -> tuple[float, float]:
    """Smallest keep in ``[min_keep, top]`` found feasible (``top`` is), and its accuracy."""
    lo, hi, hi_acc = config.min_keep, top, top_accuracy
    verdict = feasible(lo)
    if verdict["feasible"]:
        return lo, verdict["accuracy"]
    while hi - lo > config.resolution:
        mid = round((lo + hi) / 2, 6)
        verdict = feasible(mid)
        if verdict["feasible"]:
            hi, hi_acc = mid, verdict["accuracy"]
        else:
            lo = mid
    return hi, hi_acc


def _judge(fitness: Fitness, budget: float, what: str) -> Callable[[dict | float], dict]:
    """``fitness.judge`` at this budget, its progress bar named after the bisection."""
    def judge(levels):
        fitness.label = f"search: {what}"
        return fitness.judge(levels, budget)
    return judge


def _progress(what: str, keep: float, verdict: dict) -> None:
    """One line per bisection step: these take minutes on a CPU and have no natural bar."""
    accuracy = "" if verdict["accuracy"] is None else f", accuracy {verdict['accuracy']:.4f}"
    rank_zero_info(f"[sieve-pl] search ({what}): keep {keep:.4f} "
                   f"{'feasible' if verdict['feasible'] else 'rejected'}{accuracy}")


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
