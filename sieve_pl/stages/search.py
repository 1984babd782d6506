"""Search: one keep level per pruning unit, as large a cut as validation accuracy allows.

First the largest *uniform* cut within tolerance is found by bisection over the keep fraction
(accuracy is assumed to fall as the keep fraction falls); then, kind by kind (MLPs, q, k, v, o…:
the units that play one part in every layer), largest first, each kind's keep is bisected
further down with the others held (``seed_by_kind``): units of different kinds differ far more
in what a cut costs than units of one kind. That allocation seeds a genetic algorithm (DEAP)
whose genome holds one rung of the keep ladder per unit: different units tolerate very
different cuts. Candidates are cut from the stored bases (nothing is refitted) and scored by
:class:`Fitness`; every generation is checkpointed so a killed search resumes where it stopped
and ends exactly where an uninterrupted one would.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch
from deap import algorithms, base, creator, tools
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from tqdm.auto import tqdm

from ..errors import SieveError
from ..io import crash_point, read_json, write_json
from ..models.pruning import layer_and_kind


@dataclass
class SearchConfig:
    """How much accuracy may be lost, and how the keep levels are searched.

    Args:
        strategy: genetic (one level per unit, seeded by the uniform level) or uniform only.
        epsilon: allowed accuracy loss, in (0, 1).
        relative: true: target is (1 - epsilon) * base accuracy; false: base accuracy - epsilon.
        ladder: keep fractions (of its weights) a unit may take, each in (0, 1]; 1 keeps it
            dense.
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
        seed_by_kind: after the uniform bisection, bisect each kind of unit further (largest
            kind first, the others held) and seed the GA with that allocation too.
        confidence: z of a one-sided bound on the accuracy change: a candidate is feasible when
            its lost score plus ``confidence·sqrt(Σ (s_base − s)²)`` stays within the budget.
            The root term is the noise of the paired difference (for 0/1 scores: the square
            root of the examples it answers differently from the base model), so a candidate
            that breaks many examples and is rescued by lucky fixes — one that holds epsilon on
            this split only — is refused. 0 = the plain accuracy constraint.
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
    screen: float = 0.25
    resolution: float = 0.01
    min_keep: float = 0.05
    rank_multiple: int = 1
    seed_by_kind: bool = True
    confidence: float = 1.0

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
    score only grows). :meth:`hardest_first` puts the examples the base model gets wrong first,
    then those it gets right by the smallest margin, so a candidate that is going to fail spends
    its budget, and is stopped, sooner. Candidates are memoised on their sizes (:meth:`judge`).
    """

    def __init__(self, trainer, lm, pruner, dataloader, early_reject: bool = True,
                 confidence: float = 0.0):
        self.trainer, self.lm, self.pruner, self.early_reject = trainer, lm, pruner, early_reject
        self.confidence = confidence
        self.base: list[float] | None = None  # the base model's scores, in scoring order
        self.loader = dataloader
        self.batches = list(dataloader)
        self.n = sum(len(b["input_ids"]) for b in self.batches)
        self.tokens_total = int(sum(b["attention_mask"].sum() for b in self.batches))
        self.tokens_spent = 0
        self.evaluations = 0
        self.order: list[int] | None = None
        self.memo: dict[str, dict] = {}  # judged candidates, by their unit sizes

    def budget(self, target: float) -> float:
        """Most score a feasible candidate may lose (mean score ≥ target); for 0/1 scores,
        ``⌊n − target·n⌋`` errors."""
        return self.n - target * self.n + 1e-9

    def reorder(self, order: list[int]) -> None:
        """Score the examples in this order from now on (indices into the split)."""
        from torch.utils.data import DataLoader, Subset

        self.order = list(order)
        loader = self.loader
        self.batches = list(DataLoader(Subset(loader.dataset, self.order),
                                       batch_size=loader.batch_size, collate_fn=loader.collate_fn))

    def hardest_first(self) -> list[float]:
        """Score the examples the base model gets wrong, then those it gets right by the
        smallest margin, first: pruned candidates fail there first, so early rejection and
        screening decide after fewer examples. Returns the base model's scores (split order)."""
        scores = self.correct(1.0)
        safety = self.correct(1.0, measure=self.lm.task.confidence)
        self.reorder(sorted(range(self.n), key=lambda i: (scores[i], safety[i])))
        self.base = [scores[i] for i in self.order]
        return scores

    @staticmethod
    def lost(scores: list[float]) -> float:
        """Score lost to mistakes, summed in order: ``Σ(1 − s)``."""
        total = 0.0
        for s in scores:
            total += 1 - s
        return total

    def excess(self, scores: list[float]):
        """Running ``Σ(1 − s) + confidence·sqrt(Σ(s_base − s)²)`` over scores in scoring order:
        what a candidate spends of the budget. Both sums only grow, so a candidate over the
        budget after some examples is over it after all of them (early rejection is exact)."""
        lost, spread = 0.0, 0.0
        base = self.base if self.confidence and self.base is not None else None
        for i, s in enumerate(scores):
            lost += 1 - s
            if base is not None:
                spread += (base[i] - s) ** 2
            yield lost + self.confidence * spread ** 0.5

    @torch.inference_mode()
    def correct(self, keep, max_errors: float | None = None, *, until: int | None = None,
                prior: list[float] | None = None, measure=None) -> list[float]:
        """Per-example scores (``measure``, default the task's score) in scoring order.

        Scoring stops at the first batch round after more than ``max_errors`` score is lost,
        or once ``until`` examples are scored; ``prior`` holds the scores of a first part
        already scored at these levels, which is continued rather than redone.
        """
        self.pruner.apply(keep)
        measure = measure or self.lm.task.score
        strategy = self.trainer.strategy
        world, rank, device = self.trainer.world_size, self.trainer.global_rank, strategy.root_device
        net = self.lm.net.to(device).eval()
        size = max(len(b["input_ids"]) for b in self.batches)
        scores: list[float] = list(prior or [])
        first, done = 0, 0
        while done < len(scores):  # the rounds ``prior`` covers
            done += sum(len(b["input_ids"]) for b in self.batches[first:first + world])
            first += world
        if done != len(scores):
            raise ValueError("prior scores must end at a batch round")
        self.evaluations += 1
        for start in range(first, len(self.batches), world):
            # NaN: no example; the last slot carries the tokens this rank spent
            local = torch.full((size + 1,), float("nan"), dtype=torch.float64, device=device)
            local[-1] = 0
            if start + rank < len(self.batches):
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in self.batches[start + rank].items()}
                hits = measure(net, batch).double()
                local[:len(hits)] = hits
                local[-1] = batch["attention_mask"].sum()
            gathered = strategy.all_gather(local).reshape(-1, size + 1) if world > 1 else local[None]
            self.tokens_spent += int(gathered[:, -1].sum())
            scores += [x for x in gathered[:, :-1].flatten().tolist() if x == x]
            if (max_errors is not None and self.early_reject and scores
                    and list(self.excess(scores))[-1] > max_errors):
                break
            if until is not None and len(scores) >= until:
                break
        return scores

    def accuracy(self, keep) -> float:
        """Mean score (the task's primary metric) of the candidate on the whole split."""
        return sum(self.correct(keep)) / self.n

    def _verdict(self, scores: list[float], budget: float) -> dict:
        over_at = next((i for i, spent in enumerate(self.excess(scores)) if spent > budget), None)
        return {"feasible": over_at is None, "over_at": over_at, "seen": len(scores),
                "accuracy": sum(scores) / self.n if len(scores) == self.n else None}

    def judge(self, keep, budget: float, until: int | None = None) -> dict:
        """Is the candidate feasible (lost score ≤ budget)? Memoised on its sizes: keep levels
        that round to the same ranks / neuron counts (``rank_multiple``) are one candidate, scored once.

        ``over_at``: how many examples (in scoring order) it got through before its lost score
        exceeded the budget (None when feasible); ``accuracy`` is known when it was scored on
        every example. With ``until`` only the first ``until`` examples are scored: a candidate
        that fails on them is infeasible (exactly as full scoring would find), one that passes
        is only ``provisional``; completing it later continues where the screening stopped.
        """
        sizes = self.pruner.sizes(keep)
        key = f"{budget!r}:" + ",".join(str(sizes.get(n, 0)) for n in self.pruner.names)
        if key in self.memo:
            return self.memo[key]
        part = self.memo.get(key + "~")
        if until is not None and until < self.n:
            if part is None:
                scores = self.correct(keep, budget, until=until)
                part = self.memo[key + "~"] = {**self._verdict(scores, budget), "scores": scores,
                                               "provisional": True}
            if part["feasible"]:
                return part
            scores = part["scores"]  # failed the screening: as final as a full scoring
        else:
            scores = self.correct(keep, budget, prior=part["scores"] if part else None)
        self.memo.pop(key + "~", None)
        self.memo[key] = self._verdict(scores, budget)
        return self.memo[key]

    def state(self) -> dict:
        return {"tokens_spent": self.tokens_spent, "evaluations": self.evaluations,
                "memo": self.memo, "order": self.order, "base": self.base}

    def restore(self, state: dict) -> None:
        self.tokens_spent, self.evaluations = state["tokens_spent"], state["evaluations"]
        self.memo = state["memo"]
        self.base = state.get("base")
        if state["order"] is not None and state["order"] != self.order:
            self.reorder(state["order"])


def _progress(what: str, keep: float, verdict: dict) -> None:
    """One line per bisection step: these take minutes on a CPU and have no natural bar."""
    accuracy = "" if verdict["accuracy"] is None else f", accuracy {verdict['accuracy']:.4f}"
    rank_zero_info(f"[sieve-pl] search ({what}): keep {keep:.4f} "
                   f"{'feasible' if verdict['feasible'] else 'rejected'}{accuracy}")


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


def _key(genome) -> str:
    return ",".join(map(str, genome))


class GeneticSearch:
    """DEAP GA over ladder rungs with lazily scored genomes; resumable after every generation.

    Fitness of a genome: the fraction of target weights removed when it is feasible (≥ 0);
    otherwise ``seen / n - 1`` (< 0), where ``seen`` is how many validation examples (in scoring
    order) it got through before its errors exceeded the budget. Genomes that fall further short
    fail earlier and rank lower; the value is the same with or without early rejection and for
    any number of ranks.

    The fraction removed is known without scoring and bounds the fitness from above, so
    selection (tournaments, the elite, the final best) scores contenders in decreasing order
    of that bound and stops once no unscored one can win: most losing genomes are never scored.
    Tournaments only need a contender to pass ``screen`` of the split (the hardest examples,
    which is where candidates fail); the elite and the final best are scored on all of it,
    continuing their screening rather than redoing it.
    """

    def __init__(self, fitness: Fitness, names: list[str], ladder: list[float], target: float,
                 config: SearchConfig, work: Path | None, is_writer: bool = True):
        self.fitness, self.names, self.ladder, self.config = fitness, names, ladder, config
        self.target, self.budget = target, fitness.budget(target)
        self.work, self.is_writer = work, is_writer
        self.screen = math.ceil(config.screen * fitness.n) if config.screen < 1 else None
        self.cache: dict[str, dict] = {}  # genomes scored on the whole split
        self.seen: dict[str, list[int]] = {}  # every genome of every generation, first seen first
        self.toolbox = base.Toolbox()
        self.toolbox.register("mate", tools.cxTwoPoint)
        self.toolbox.register("mutate", _step_mutation, top=len(ladder) - 1,
                              indpb=config.gene_mutation_prob)

    def levels(self, genome) -> dict[str, float]:
        return {n: self.ladder[g] for n, g in zip(self.names, genome)}

    def bound(self, genome) -> float:
        """Fraction of target weights the genome removes: its fitness if feasible, an upper
        bound on it in any case; free to compute."""
        kept, total = self.fitness.pruner.params(self.levels(genome))
        return 1 - kept / total

    def score(self, genome, full: bool = True) -> dict:
        """The genome's fitness; ``full=False`` accepts a provisional one from the screening.
        Cached: a genome is never scored twice."""
        key = _key(genome)
        if key in self.cache:
            return self.cache[key]
        levels = self.levels(genome)
        verdict = self.fitness.judge(levels, self.budget, None if full else self.screen)
        kept, total = self.fitness.pruner.params(levels)
        value = (1 - kept / total if verdict["feasible"]
                 else verdict["over_at"] / self.fitness.n - 1)
        record = {"value": value, "kept": kept,
                  **{k: v for k, v in verdict.items() if k != "scores"}}
        if not verdict.get("provisional"):
            self.cache[key] = record
        return record

    def best(self, genomes: list, k: int, full: bool = True) -> list:
        """The first ``k`` of ``genomes`` sorted by fitness, best first (ties keep their order,
        as ``sorted`` does), scoring only the genomes that could be among them."""
        if k <= 0:
            return []
        bounds = [self.bound(g) for g in genomes]
        order = sorted(range(len(genomes)), key=lambda i: -bounds[i])
        known: list[tuple[float, int]] = []
        for i in order:
            if len(known) >= k:
                kth = sorted(known, key=lambda t: (-t[0], t[1]))[k - 1][0]
                if bounds[i] < kth:
                    break  # this and every later genome scores below the k-th best
            known.append((self.score(genomes[i], full)["value"], i))
        return [genomes[i] for _, i in sorted(known, key=lambda t: (-t[0], t[1]))[:k]]

    def select(self, population: list, k: int) -> list:
        """DEAP's tournament selection (the same random draws), with lazily scored aspirants
        that need only pass the screening."""
        return [self.best(tools.selRandom(population, self.config.tournament_size), 1,
                          full=False)[0] for _ in range(k)]

    def initial(self, seeds: list[list[int]]):
        """The seed genomes (the uniform level, the kind allocation) plus sparse random ones.

        Each random genome prunes a random share (5–50%) of the matrices, each to a random rung
        biased towards light cuts, and keeps the rest dense: cutting every matrix a little costs
        far more accuracy than cutting some a lot, so these start near the feasible region.
        """
        top = len(self.ladder) - 1
        genomes = [list(g) for g in dict.fromkeys(tuple(g) for g in seeds)]
        while len(genomes) < self.config.population:
            share = random.uniform(0.05, 0.5)
            genomes.append([random.randint(1, random.randint(1, top))
                            if top and random.random() < share else 0 for _ in self.names])
        return [creator.SieveGenome(g) for g in genomes]

    def _save(self, generation, population, logbook) -> None:
        if self.work is None or not self.is_writer:
            return
        write_json(self.work / "state.json", {
            "generation": generation, "population": [list(g) for g in population],
            "seen": list(self.seen.values()), "logbook": list(logbook), "cache": self.cache,
            "rng": _rng_state(), "fitness": self.fitness.state()})
        crash_point("search:generation")

    def _restore(self, logbook):
        path = self.work / "state.json" if self.work else None
        if path is None or not path.exists():
            return None, -1
        state = read_json(path)
        self.cache = state["cache"]
        self.seen = {_key(g): g for g in state["seen"]}
        _set_rng_state(state["rng"])
        self.fitness.restore(state["fitness"])
        for record in state["logbook"]:
            logbook.record(**record)
        return [creator.SieveGenome(g) for g in state["population"]], state["generation"]

    def _generation(self, generation, population, logbook) -> None:
        """Record a finished generation and checkpoint it."""
        for genome in population:
            self.seen.setdefault(_key(genome), list(genome))
        leader = self.best(population, 1)[0]
        scored = [self.cache[_key(g)]["value"] for g in population if _key(g) in self.cache]
        logbook.record(generation=generation, evaluations=self.fitness.evaluations,
                       scored=len(scored), best=self.score(leader)["value"],
                       mean=sum(scored) / len(scored), feasible=sum(v >= 0 for v in scored),
                       tokens_spent=self.fitness.tokens_spent)
        self._save(generation, population, logbook)

    def run(self, seeds: list[list[int]]) -> dict:
        cfg = self.config
        logbook = tools.Logbook()
        population, done = self._restore(logbook)
        if population is None:
            random.seed(cfg.seed)
            population = self.initial(seeds)
            self._generation(0, population, logbook)
            done = 0
        bar = tqdm(range(done + 1, cfg.generations + 1), desc="search (genetic)", unit="gen",
                   initial=done, total=cfg.generations, disable=not self.is_writer)
        for generation in bar:
            elite = [self.toolbox.clone(g) for g in self.best(population, cfg.elite)]
            offspring = self.select(population, len(population) - cfg.elite)
            offspring = algorithms.varAnd(offspring, self.toolbox, cfg.crossover_prob,
                                          cfg.mutation_prob)
            population = elite + offspring
            self._generation(generation, population, logbook)
            bar.set_postfix(best=f"{logbook[-1]['best']:.4f}", scored=len(self.cache))
        seen = [creator.SieveGenome(g) for g in self.seen.values()]
        best = self.best(seen, 1)[0]
        feasible = sorted((g for g in seen if self.cache.get(_key(g), {}).get("feasible")),
                          key=lambda g: -self.cache[_key(g)]["value"])[:10]
        return {"genome": list(best), "levels": self.levels(best), **self.score(best),
                "bottlenecks": [n for i, n in enumerate(self.names)
                                if feasible and all(self.ladder[g[i]] == 1.0 for g in feasible)],
                "logbook": list(logbook), "distinct_genomes": len(self.seen),
                "scored_genomes": len(self.cache)}


def ladder_with(ladder: list[float], *keeps: float) -> list[float]:
    """The ladder, descending, with the seeds' levels added as rungs of their own."""
    return sorted(set(ladder) | {1.0, *keeps}, reverse=True)


def kinds_of(fitness: Fitness, names: list[str]) -> dict[str, list[str]]:
    """Units grouped by kind, the kind holding the most weights first."""
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(layer_and_kind(name)[1], []).append(name)
    units = fitness.pruner.units
    return dict(sorted(kinds.items(), key=lambda kv: -sum(units[n].total for n in kv[1])))


def search(fitness: Fitness, names: list[str], config: SearchConfig, work: Path | None,
           is_writer: bool = True) -> dict:
    """Uniform bisection, then (strategy genetic) the GA seeded with its level."""
    uniform_path = work / "uniform.json" if work else None
    if uniform_path and uniform_path.exists():
        uniform = read_json(uniform_path)
        fitness.restore(uniform["fitness"])
    else:
        base_scores = fitness.hardest_first()
        base_accuracy = sum(base_scores) / fitness.n
        budget = fitness.budget(config.target(base_accuracy))
        slack = budget - Fitness.lost(base_scores)
        if slack < 3:
            rank_zero_warn(
                f"search: epsilon {config.epsilon} allows {slack:.1f} more lost score than the "
                f"base model's on {fitness.n} validation examples; levels chosen on so few errors "
                "fit this split's noise (use more validation examples or a larger epsilon)")
        uniform = uniform_search(lambda keep: fitness.judge(keep, budget), base_accuracy, config)
        if config.seed_by_kind and config.strategy == "genetic":
            uniform["seed"] = kind_search(lambda levels: fitness.judge(levels, budget),
                                          kinds_of(fitness, names), uniform["keep"],
                                          uniform["accuracy"], config)
        uniform["fitness"] = fitness.state()
        if uniform_path and is_writer:
            write_json(uniform_path, uniform)
    uniform_tokens, uniform_evaluations = (uniform["fitness"]["tokens_spent"],
                                           uniform["fitness"]["evaluations"])
    result = {"base_accuracy": uniform["base_accuracy"], "target": uniform["target"],
              "uniform": {k: v for k, v in uniform.items() if k not in ("fitness", "seed")},
              "seed": uniform.get("seed"),
              "validation_examples": fitness.n, "validation_tokens": fitness.tokens_total}
    if config.strategy == "uniform":
        kept, total = fitness.pruner.params(uniform["keep"])
        return {**result, "levels": dict.fromkeys(names, uniform["keep"]),
                "accuracy": uniform["accuracy"], "kept": kept, "feasible": True,
                "cost": {"search_tokens": uniform_tokens, "evaluations": uniform_evaluations}}
    seed = uniform.get("seed") or {"levels": dict.fromkeys(names, uniform["keep"])}
    ladder = ladder_with(config.ladder, uniform["keep"], *seed["levels"].values())
    ga = GeneticSearch(fitness, names, ladder, uniform["target"], config, work, is_writer)
    found = ga.run([[ladder.index(seed["levels"][n]) for n in names],
                    [ladder.index(uniform["keep"])] * len(names)])
    naive = config.population * (config.generations + 1) * fitness.tokens_total
    return {**result, **found, "ladder": ladder,
            "cost": {"search_tokens": fitness.tokens_spent, "evaluations": fitness.evaluations,
                     "ga_tokens": fitness.tokens_spent - uniform_tokens,
                     "ga_evaluations": fitness.evaluations - uniform_evaluations,
                     "uniform_tokens": uniform_tokens, "naive_tokens": naive}}
