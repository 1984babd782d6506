"""The search's settings: how much accuracy may be lost and how levels are searched.

Its own module because more than the search reads them: the GA (``genetic.py``), confirmation
(ε and its bound) and the evaluation report.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Literal

from ..errors import SieveError


@dataclass
class SearchConfig:
    """How much accuracy may be lost, and how the keep levels are searched.

    Args:
        strategy: genetic (one level per unit, a GA seeded by the uniform level and the seeds),
            sensitivity (the sensitivity price path alone: the longest prefix within epsilon;
            no uniform bisection, no GA: cheaper, for levels close to the GA's; bench/README,
            "GA or the price path") or uniform only.
        epsilon: allowed accuracy loss, in (0, 1).
        relative: true: target is (1 - epsilon) * base accuracy; false: base accuracy - epsilon.
        ladder: keep fractions (of its weights) a unit may take, each in (0, 1]; 1 keeps it
            dense. The smallest rung is as deep as the seeds and the GA cut any unit (the
            uniform level may go lower): validation does not show what very deep cuts of single
            units cost, so deeper rungs buy few weights and lose accuracy out of sample
            (bench/README, "Refits damped towards the dense weights").
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
            (then the GA takes exactly the decisions of one that scores every genome). Below 1,
            most losing genomes are stopped on the examples where candidates fail, for the
            same levels at fewer tokens (bench/README, "Pipeline cost").
        resolution: uniform bisection stops when the keep interval is narrower than this.
        min_keep: smallest uniform keep fraction tried.
        rank_multiple: round every factored rank down to a multiple of this (32 or 64 suit GPU
            kernels and bitsandbytes' CPU nf4 kernel; 1 = exact keep fractions).
        seeds: allocations bisected after the uniform level to seed the GA (and reported
            beside it). sensitivity: units ordered by their estimated cost per weight removed
            (K-FAC: one backward pass over the calibration split), one global threshold
            bisected against epsilon (about 7 evaluations). kind: each kind of unit bisected
            further, largest kind first, the others held (one bisection per kind: several times
            the evaluations). Default sensitivity: far fewer evaluations than the kind seed, and
            it prices units by what a cut changes in the model's answers rather than by their
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


@dataclass
class SearchResult:
    """What :func:`~sieve_pl.stages.search.search` found; :meth:`record` is ``search.json``.

    Every strategy: the ``levels``, their validation ``accuracy`` and weights ``kept``, the
    base model's accuracy and the ``target``, the uniform bisection, the price ``path`` and
    the seed allocations, the split's size and the search's ``cost`` in forward tokens.
    The GA adds its best ``genome`` (on the ``ladder``) and its fitness ``value``, how far
    its scoring went (``over_at``, ``seen``, the ``pool``'s verdict), the units every feasible
    genome kept dense (``bottlenecks``), the ``logbook`` and how many genomes it bred and
    scored; the sensitivity strategy the path's ``steps`` and the bisection's ``history``.
    """

    levels: dict[str, float]
    accuracy: float
    base_accuracy: float
    target: float
    kept: int
    feasible: bool
    cost: dict
    uniform: dict
    path: list
    seeds: dict
    validation_examples: int
    validation_tokens: int
    # strategy genetic
    genome: list[int] | None = None
    value: float | None = None
    over_at: float | None = None
    seen: int | None = None
    pool: dict | None = None
    bottlenecks: list[str] | None = None
    logbook: list[dict] | None = None
    distinct_genomes: int | None = None
    scored_genomes: int | None = None
    ladder: list[float] | None = None
    # strategy sensitivity
    steps: int | None = None
    history: list[dict] | None = None

    GENETIC = ("genome", "value", "over_at", "seen", "bottlenecks", "logbook",
               "distinct_genomes", "scored_genomes", "ladder")

    def record(self) -> dict:
        """The JSON form: the fields of the strategy that ran (``over_at`` may be None)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if (f.name in self.GENETIC and self.genome is not None) or value is not None:
                out[f.name] = value
        return out

    @classmethod
    def from_record(cls, record: dict) -> SearchResult:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in known})
