"""Genetic search: the DEAP GA over keep-ladder rungs that refines the bisections' allocation.

:class:`GeneticSearch` holds one rung per unit per genome, scores genomes lazily through
:class:`~sieve_pl.stages.fitness.Fitness` (only those that could win a selection), and
checkpoints every generation (population, caches, RNG) so a killed search resumes exactly.
"""
from __future__ import annotations

import math
import random
from pathlib import Path

from deap import base, creator, tools
from tqdm.auto import tqdm

from ..io import crash_point, read_json, resumable, say, write_json
from ..progress import quiet

from .fitness import Fitness
from .search_config import SearchConfig


# DEAP's creator registers classes globally; create them once per process.
if not hasattr(creator, "SieveFitness"):
    creator.create("SieveFitness", base.Fitness, weights=(1.0,))
    creator.create("SieveGenome", list, fitness=creator.SieveFitness)


# The operators draw from the search's own ``random.Random``: DEAP's (``tools.cxTwoPoint``,
# ``tools.selRandom``, ``algorithms.varAnd``) draw from the process-global ``random`` module.
# Each makes DEAP's draws in DEAP's order, so a seed breeds the genomes DEAP's would.

def _step_mutation(genome, rng: random.Random, top: int, indpb: float):
    """Move each gene one rung up or down the ladder with probability ``indpb``."""
    for i in range(len(genome)):
        if rng.random() < indpb:
            genome[i] = min(top, max(0, genome[i] + rng.choice((-1, 1))))
    return (genome,)


def _two_point_crossover(a, b, rng: random.Random):
    """``tools.cxTwoPoint``: swap the genes between two cut points, in place."""
    size = min(len(a), len(b))
    first, second = rng.randint(1, size), rng.randint(1, size - 1)
    if second >= first:
        second += 1
    else:
        first, second = second, first
    a[first:second], b[first:second] = b[first:second], a[first:second]
    return a, b


def _vary(population: list, toolbox, rng: random.Random, crossover_prob: float,
          mutation_prob: float) -> list:
    """``algorithms.varAnd``: clones, paired crossover, then mutation, each with its chance."""
    offspring = [toolbox.clone(g) for g in population]
    for i in range(1, len(offspring), 2):
        if rng.random() < crossover_prob:
            offspring[i - 1], offspring[i] = toolbox.mate(offspring[i - 1], offspring[i])
            del offspring[i - 1].fitness.values, offspring[i].fitness.values
    for i in range(len(offspring)):
        if rng.random() < mutation_prob:
            offspring[i], = toolbox.mutate(offspring[i])
            del offspring[i].fitness.values
    return offspring


def _rng_state(rng: random.Random) -> list:
    version, state, gauss = rng.getstate()
    return [version, list(state), gauss]


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
        self.progress = "search: genetic"  # the scoring bar's name: the generation bred
        # the search's own random stream: seeded with ``search.seed``, saved with every
        # generation; the process-global ``random`` is never drawn from or seeded
        self.rng = random.Random(config.seed)
        self.toolbox = base.Toolbox()
        self.toolbox.register("mate", _two_point_crossover, rng=self.rng)
        self.toolbox.register("mutate", _step_mutation, rng=self.rng, top=len(ladder) - 1,
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
        verdict = self.fitness.judge(levels, self.budget, None if full else self.screen,
                                     label=self.progress)
        kept, total = self.fitness.pruner.params(levels)
        value = (1 - kept / total if verdict.feasible
                 else verdict.over_at / self.fitness.n - 1)
        record = {"value": value, "kept": kept, **verdict.record(scores=False)}
        if not verdict.provisional:
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
        size = self.config.tournament_size
        return [self.best([self.rng.choice(population) for _ in range(size)], 1,
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
            share = self.rng.uniform(0.05, 0.5)
            genomes.append([self.rng.randint(1, self.rng.randint(1, top))
                            if top and self.rng.random() < share else 0 for _ in self.names])
        return [creator.SieveGenome(g) for g in genomes]

    def _save(self, generation, population, logbook) -> None:
        if self.work is None or not self.is_writer:
            return
        write_json(self.work / "state.json", {
            "generation": generation, "population": [list(g) for g in population],
            "seen": list(self.seen.values()), "logbook": list(logbook), "cache": self.cache,
            "rng": _rng_state(self.rng), "fitness": self.fitness.state()})
        crash_point("search:generation")

    def _restore(self, logbook):
        """The last finished generation from ``state.json``, or ``(None, -1)`` for a fresh start.

        A truncated or damaged file (a disk that filled mid-write, an edit) restarts the search
        from its seed with a warning: a search that fails on its own checkpoint never finishes.
        """
        def read(path: Path) -> dict:  # everything read and checked before anything changes
            state = read_json(path)
            rng = state["rng"]
            return {"rng": (int(rng[0]), tuple(map(int, rng[1])), rng[2]),
                    "population": [creator.SieveGenome(list(map(int, g)))
                                   for g in state["population"]],
                    "generation": int(state["generation"]), "cache": dict(state["cache"]),
                    "seen": {_key(g): list(g) for g in state["seen"]},
                    "logbook": [dict(r) for r in state["logbook"]],
                    "fitness": dict(state["fitness"])}

        state = resumable(self.work / "state.json", read,
                          "starting the search from generation 0") if self.work else None
        if state is None:
            return None, -1
        self.cache, self.seen = state["cache"], state["seen"]
        self.rng.setstate(state["rng"])  # the stream goes on where the last generation left it
        self.fitness.restore(state["fitness"])
        for record in state["logbook"]:
            logbook.record(**record)
        return state["population"], state["generation"]

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
        """The GA from ``seeds``, drawing from its own stream (``search.seed``, or the
        checkpoint's state when it resumes)."""
        cfg = self.config
        budget = cfg.population * (cfg.generations + 1)
        if self.is_writer:  # the budget against the genome's length: a search, or a local probe
            say(f"[sieve-pl] search (genetic): {len(self.names)} genes, population "
                f"{cfg.population} x {cfg.generations + 1} generations = {budget} genomes "
                f"({budget / len(self.names):.1f} per gene; each scored only when it could win)")
        logbook = tools.Logbook()
        population, done = self._restore(logbook)
        if population is None:
            self.rng.seed(cfg.seed)
            self.progress = f"search: generation 0/{cfg.generations}"
            population = self.initial(seeds)
            self._generation(0, population, logbook)
            done = 0
        bar = tqdm(range(done + 1, cfg.generations + 1), desc="search (genetic)", unit="gen",
                   initial=done, total=cfg.generations,
                   disable=not self.is_writer or quiet(self.fitness.trainer))
        for generation in bar:
            self.progress = f"search: generation {generation}/{cfg.generations}"
            elite = [self.toolbox.clone(g) for g in self.best(population, cfg.elite)]
            offspring = self.select(population, len(population) - cfg.elite)
            offspring = _vary(offspring, self.toolbox, self.rng, cfg.crossover_prob,
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
