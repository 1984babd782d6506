"""Search: one keep level per target matrix, as large a cut as validation accuracy allows.

First the largest *uniform* cut within tolerance is found by bisection over the keep fraction
(accuracy is assumed to fall as the keep fraction falls). It seeds a genetic algorithm (DEAP)
whose genome holds one rung of the keep ladder per matrix: different matrices tolerate very
different cuts. Candidates are cut from the stored bases (nothing is refitted) and scored by
:class:`Fitness`; every generation is checkpointed so a killed search resumes where it stopped
and ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from deap import algorithms, base, creator, tools
from tqdm.auto import tqdm

from ..errors import SieveError
from ..io import crash_point, read_json, write_json


@dataclass
class SearchConfig:
    """How much accuracy may be lost, and how the keep levels are searched.

    Args:
        strategy: genetic (one level per matrix, seeded by the uniform level) or uniform only.
        epsilon: allowed accuracy loss, in (0, 1).
        relative: true: target is (1 - epsilon) * base accuracy; false: base accuracy - epsilon.
        ladder: keep fractions a matrix may take, each in (0, 1]; 1 keeps it dense.
        population: genomes per generation.
        generations: generations after the initial population.
        crossover_prob: probability that a pair of parents is crossed over (two-point).
        mutation_prob: probability that a child is mutated.
        gene_mutation_prob: per-gene probability of a ±1 ladder step in a mutated child.
        tournament_size: genomes per selection tournament.
        elite: best genomes copied unchanged into the next generation.
        seed: seed of the search's random choices.
        early_reject: stop scoring a candidate once its errors exceed the tolerance budget.
        resolution: uniform bisection stops when the keep interval is narrower than this.
        min_keep: smallest uniform keep fraction tried.
        rank_multiple: round every factored rank down to a multiple of this (32 or 64 suit GPU
            kernels and bitsandbytes' CPU nf4 kernel; 1 = exact keep fractions).
    """

    strategy: Literal["genetic", "uniform"] = "genetic"
    epsilon: float = 0.05
    relative: bool = True
    ladder: list[float] = field(
        default_factory=lambda: [1.0, 0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1])
    population: int = 16
    generations: int = 10
    crossover_prob: float = 0.7
    mutation_prob: float = 0.5
    gene_mutation_prob: float = 0.05
    tournament_size: int = 3
    elite: int = 2
    seed: int = 0
    early_reject: bool = True
    resolution: float = 0.01
    min_keep: float = 0.05
    rank_multiple: int = 1

    def check(self) -> None:
        if not 0 < self.epsilon < 1:
            raise SieveError(f"search.epsilon must be in (0, 1), got {self.epsilon}")
        if not 0 < self.min_keep < 1:
            raise SieveError(f"search.min_keep must be in (0, 1), got {self.min_keep}")
        if not 0 < self.resolution < 1:
            raise SieveError(f"search.resolution must be in (0, 1), got {self.resolution}")
        if not self.ladder or any(not 0 < p <= 1 for p in self.ladder):
            raise SieveError(f"search.ladder values must be in (0, 1], got {self.ladder}")
        if self.rank_multiple < 1:
            raise SieveError(f"search.rank_multiple must be >= 1, got {self.rank_multiple}")
        if self.population < 2 or self.generations < 0 or not 0 <= self.elite < self.population:
            raise SieveError("search needs population >= 2, generations >= 0 and "
                             "0 <= elite < population")

    def target(self, base_accuracy: float) -> float:
        return (base_accuracy * (1 - self.epsilon) if self.relative
                else base_accuracy - self.epsilon)


class Fitness:
    """Scores keep levels on the validation split by the task's per-example scores.

    A score is 1 for a right answer and 0 for a wrong one (accuracy, exact match) or in between
    (token F1); a candidate's *lost score* is ``Σ(1 − s)`` (its errors, for 0/1 scores).
    Batches are tokenized once. Under DDP each rank scores every world-size-th batch and the
    per-example scores are gathered in order, so every rank takes the same decisions as one
    process would. With ``early_reject`` scoring stops at the first batch round after the
    budget ``n − target·n`` of lost score is exceeded: feasibility is still exact (the lost
    score only grows).
    """

    def __init__(self, trainer, lm, pruner, dataloader, early_reject: bool = True):
        self.trainer, self.lm, self.pruner, self.early_reject = trainer, lm, pruner, early_reject
        self.batches = list(dataloader)
        self.n = sum(len(b["input_ids"]) for b in self.batches)
        self.tokens_total = int(sum(b["attention_mask"].sum() for b in self.batches))
        self.tokens_spent = 0
        self.evaluations = 0

    def budget(self, target: float) -> float:
        """Most score a feasible candidate may lose (mean score ≥ target); for 0/1 scores,
        ``⌊n − target·n⌋`` errors."""
        return self.n - target * self.n + 1e-9

    @staticmethod
    def lost(scores: list[float]) -> float:
        """Score lost to mistakes, summed in order: ``Σ(1 − s)``."""
        total = 0.0
        for s in scores:
            total += 1 - s
        return total

    @torch.inference_mode()
    def correct(self, keep, max_errors: float | None = None) -> list[float]:
        """Per-example scores in dataset order, possibly cut short once more than
        ``max_errors`` score is lost."""
        self.pruner.apply(keep)
        strategy = self.trainer.strategy
        world, rank, device = self.trainer.world_size, self.trainer.global_rank, strategy.root_device
        net = self.lm.net.to(device).eval()
        size = max(len(b["input_ids"]) for b in self.batches)
        scores: list[float] = []
        self.evaluations += 1
        for start in range(0, len(self.batches), world):
            # NaN: no example; the last slot carries the tokens this rank spent
            local = torch.full((size + 1,), float("nan"), dtype=torch.float64, device=device)
            local[-1] = 0
            if start + rank < len(self.batches):
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in self.batches[start + rank].items()}
                hits = self.lm.task.score(net, batch).double()
                local[:len(hits)] = hits
                local[-1] = batch["attention_mask"].sum()
            gathered = strategy.all_gather(local).reshape(-1, size + 1) if world > 1 else local[None]
            self.tokens_spent += int(gathered[:, -1].sum())
            scores += [x for x in gathered[:, :-1].flatten().tolist() if x == x]
            if max_errors is not None and self.early_reject and self.lost(scores) > max_errors:
                break
        return scores

    def accuracy(self, keep) -> float:
        """Mean score (the task's primary metric) of the candidate on the whole split."""
        return sum(self.correct(keep)) / self.n


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


# DEAP's creator registers classes globally; create them once per process.
if not hasattr(creator, "SieveFitness"):
    creator.create("SieveFitness", base.Fitness, weights=(1.0,))
    creator.create("SieveGenome", list, fitness=creator.SieveFitness)


def _step_mutation(genome, top: int, indpb: float):
    """Move each gene one rung up or down the ladder with probability ``indpb``."""
    for i in range(len(genome)):
        if random.random() < indpb:
            genome[i] = min(top, max(0, genome[i] + random.choice((-1, 1))))
    return (genome,)


def _rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def _set_rng_state(saved: list) -> None:
    random.setstate((saved[0], tuple(saved[1]), saved[2]))


class GeneticSearch:
    """DEAP GA over ladder rungs, resumable from the state written after every generation.

    Fitness of a genome: the fraction of target weights removed when it is feasible (≥ 0);
    otherwise ``seen / n - 1`` (< 0), where ``seen`` is how many validation examples (in order)
    it got through before its errors exceeded the budget. Errors accumulate at a rate of about
    ``1 - accuracy``, so genomes that fall further short fail earlier and rank lower; the value
    is the same with or without early rejection and for any number of ranks.
    """

    def __init__(self, fitness: Fitness, names: list[str], ladder: list[float], target: float,
                 config: SearchConfig, work: Path | None, is_writer: bool = True):
        self.fitness, self.names, self.ladder, self.config = fitness, names, ladder, config
        self.target, self.budget = target, fitness.budget(target)
        self.work, self.is_writer = work, is_writer
        self.cache: dict[str, dict] = {}
        self.toolbox = base.Toolbox()
        self.toolbox.register("mate", tools.cxTwoPoint)
        self.toolbox.register("mutate", _step_mutation, top=len(ladder) - 1,
                              indpb=config.gene_mutation_prob)
        self.toolbox.register("select", tools.selTournament, tournsize=config.tournament_size)

    def levels(self, genome) -> dict[str, float]:
        return {n: self.ladder[g] for n, g in zip(self.names, genome)}

    def score(self, genome) -> dict:
        """Cached: a genome seen before is never scored again."""
        key = ",".join(map(str, genome))
        if key not in self.cache:
            levels = self.levels(genome)
            flags = self.fitness.correct(levels, self.budget)
            kept, total = self.fitness.pruner.params(levels)
            errors = self.fitness.lost(flags)
            if errors <= self.budget:
                value = 1 - kept / total
            else:
                value = next(i for i, n in enumerate(_cumulative_errors(flags))
                             if n > self.budget) / self.fitness.n - 1
            self.cache[key] = {"value": value, "feasible": errors <= self.budget,
                               "accuracy": sum(flags) / self.fitness.n
                               if len(flags) == self.fitness.n else None,
                               "kept": kept, "seen": len(flags)}
        return self.cache[key]

    def _assign(self, population) -> int:
        fresh = [g for g in population if not g.fitness.valid]
        for genome in fresh:
            genome.fitness.values = (self.score(genome)["value"],)
        return len(fresh)

    def initial(self, seed_rung: int):
        """The uniform level's genome plus sparse random ones.

        Each random genome prunes a random share (5–50%) of the matrices, each to a random rung
        biased towards light cuts, and keeps the rest dense: cutting every matrix a little costs
        far more accuracy than cutting some a lot, so these start near the feasible region.
        """
        top = len(self.ladder) - 1
        genomes = [[seed_rung] * len(self.names)]
        while len(genomes) < self.config.population:
            share = random.uniform(0.05, 0.5)
            genomes.append([random.randint(1, random.randint(1, top))
                            if top and random.random() < share else 0 for _ in self.names])
        return [creator.SieveGenome(g) for g in genomes]

    def _save(self, generation, population, hof, logbook) -> None:
        if self.work is None or not self.is_writer:
            return
        write_json(self.work / "state.json", {
            "generation": generation,
            "population": [[list(g), g.fitness.values[0]] for g in population],
            "hall_of_fame": [[list(g), g.fitness.values[0]] for g in hof],
            "logbook": list(logbook), "cache": self.cache, "rng": _rng_state(),
            "tokens_spent": self.fitness.tokens_spent, "evaluations": self.fitness.evaluations})
        crash_point("search:generation")

    def _restore(self, hof, logbook):
        path = self.work / "state.json" if self.work else None
        if path is None or not path.exists():
            return None, -1
        state = read_json(path)
        self.cache = state["cache"]
        _set_rng_state(state["rng"])
        self.fitness.tokens_spent = state["tokens_spent"]
        self.fitness.evaluations = state["evaluations"]
        for record in state["logbook"]:
            logbook.record(**record)

        def genomes(rows):
            out = []
            for genes, value in rows:
                genome = creator.SieveGenome(genes)
                genome.fitness.values = (value,)
                out.append(genome)
            return out

        hof.items = genomes(state["hall_of_fame"])  # exact order, ties included
        hof.keys = [g.fitness for g in reversed(hof.items)]
        return genomes(state["population"]), state["generation"]

    def run(self, seed_rung: int) -> dict:
        cfg = self.config
        hof = tools.HallOfFame(max(cfg.elite, 10))
        logbook = tools.Logbook()
        population, done = self._restore(hof, logbook)
        if population is None:
            random.seed(cfg.seed)
            population = self.initial(seed_rung)
            nevals = self._assign(population)
            hof.update(population)
            self._record(logbook, 0, nevals, population)
            self._save(0, population, hof, logbook)
            done = 0
        bar = tqdm(range(done + 1, cfg.generations + 1), desc="search (genetic)", unit="gen",
                   initial=done, total=cfg.generations, disable=not self.is_writer)
        for generation in bar:
            elite = [self.toolbox.clone(g) for g in tools.selBest(population, cfg.elite)]
            offspring = self.toolbox.select(population, len(population) - cfg.elite)
            offspring = algorithms.varAnd(offspring, self.toolbox, cfg.crossover_prob,
                                          cfg.mutation_prob)
            nevals = self._assign(offspring)
            population = elite + offspring
            hof.update(population)
            self._record(logbook, generation, nevals, population)
            self._save(generation, population, hof, logbook)
            bar.set_postfix(best=f"{hof[0].fitness.values[0]:.4f}", evals=nevals)
        best = hof[0]
        feasible_hof = [g for g in hof if self.score(g)["feasible"]]
        return {"genome": list(best), "levels": self.levels(best), **self.score(best),
                "bottlenecks": [n for i, n in enumerate(self.names)
                                if feasible_hof and all(self.ladder[g[i]] == 1.0
                                                        for g in feasible_hof)],
                "logbook": list(logbook), "distinct_genomes": len(self.cache)}

    def _record(self, logbook, generation, nevals, population) -> None:
        values = [g.fitness.values[0] for g in population]
        logbook.record(generation=generation, evaluations=nevals, best=max(values),
                       mean=sum(values) / len(values),
                       feasible=sum(v >= 0 for v in values),
                       tokens_spent=self.fitness.tokens_spent)


def _cumulative_errors(flags: list[float]):
    """Running lost score ``Σ(1 − s)`` (errors, for 0/1 scores), summed as ``Fitness.lost``."""
    errors = 0.0
    for score in flags:
        errors += 1 - score
        yield errors


def ladder_with(ladder: list[float], keep: float) -> list[float]:
    """The ladder, descending, with the uniform level added as a rung of its own."""
    return sorted(set(ladder) | {1.0, keep}, reverse=True)


def search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
           is_writer: bool = True) -> dict:
    """Uniform bisection, then (strategy genetic) the GA seeded with its level."""
    uniform_path = work / "uniform.json" if work else None
    if uniform_path and uniform_path.exists():
        uniform = read_json(uniform_path)
        fitness.tokens_spent, fitness.evaluations = uniform["tokens_spent"], uniform["evaluations"]
    else:
        uniform = uniform_search(fitness.accuracy, fitness.accuracy(1.0), config)
        uniform.update(tokens_spent=fitness.tokens_spent, evaluations=fitness.evaluations)
        if uniform_path and is_writer:
            write_json(uniform_path, uniform)
    result = {"base_accuracy": uniform["base_accuracy"], "target": uniform["target"],
              "uniform": uniform,
              "validation_examples": fitness.n, "validation_tokens": fitness.tokens_total}
    if config.strategy == "uniform":
        kept, total = fitness.pruner.params(uniform["keep"])
        return {**result, "levels": dict.fromkeys(names, uniform["keep"]),
                "accuracy": uniform["accuracy"], "kept": kept, "feasible": True}
    ladder = ladder_with(config.ladder, uniform["keep"])
    ga = GeneticSearch(fitness, names, ladder, uniform["target"], config, work, is_writer)
    found = ga.run(ladder.index(uniform["keep"]))
    naive = config.population * (config.generations + 1) * fitness.tokens_total
    return {**result, **found, "ladder": ladder,
            "cost": {"ga_tokens": fitness.tokens_spent - uniform["tokens_spent"],
                     "ga_evaluations": fitness.evaluations - uniform["evaluations"],
                     "naive_tokens": naive, "uniform_tokens": uniform["tokens_spent"]}}
