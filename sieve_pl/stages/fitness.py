"""Fitness: scores a candidate's keep levels on the validation split, for the search.

One class, :class:`Fitness`: it cuts the model from the stored bases at the given levels, scores
it example by example (hardest first, gathered across DDP ranks), stops early once the error
budget is spent, and memoises each candidate, so the bisections and the GA share one scorer.
The same class scores the unlabeled pool (:func:`pool_fitness`: agreement with the dense
model's answers) and the confirmation split; a Fitness with a ``pool`` holds a candidate
feasible only when both its labelled split and the pool allow it.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from tqdm.auto import tqdm

from ..models.pruning import with_weights
from ..progress import quiet


@dataclass
class Verdict:
    """What :meth:`Fitness.judge` found of a candidate.

    ``feasible``: its lost score stayed within the budget. ``over_at``: how many examples (in
    scoring order) it got through before exceeding it (None when feasible; past the split's
    end when only the pool refused it). ``seen``: examples scored. ``accuracy``: its mean score,
    known when every example was scored. ``pool``: the unlabeled pool's verdict, for a candidate
    that held the split. ``provisional``: it passed only the screening's first examples, whose
    ``scores`` a full scoring continues.
    """

    feasible: bool
    over_at: float | None
    seen: int
    accuracy: float | None
    pool: Verdict | None = None
    provisional: bool = False
    scores: list[float] | None = None

    def record(self, scores: bool = True) -> dict:
        """The JSON form (in the search's saved state): the optional fields only when set."""
        out = {"feasible": self.feasible, "over_at": self.over_at, "seen": self.seen,
               "accuracy": self.accuracy}
        if self.pool is not None:
            out["pool"] = self.pool.record()
        if self.scores is not None and scores:
            out["scores"] = self.scores
        if self.provisional:
            out["provisional"] = True
        return out

    @classmethod
    def from_record(cls, record: dict) -> Verdict:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in record.items() if k in known}
        if values.get("pool") is not None:
            values["pool"] = cls.from_record(values["pool"])
        return cls(**values)


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
    The scoring calls take ``label``, the name of their progress bar (what is being scored).
    """

    def __init__(self, trainer, lm, pruner, dataloader, early_reject: bool = True,
                 confidence: float = 0.0, measure=None, safety=None):
        self.trainer, self.lm, self.pruner, self.early_reject = trainer, lm, pruner, early_reject
        self.confidence = confidence
        # per-example score and the base model's safety margin (default: the task's)
        self.measure, self.safety = measure, safety
        self.pool: Fitness | None = None  # the unlabeled pool a feasible candidate must pass
        self.pool_share = 1.0  # of the labelled split's allowed loss, per pool prompt
        self._weights: dict[str, torch.Tensor] = {}  # see ``weights``
        self.base: list[float] | None = None  # the base model's scores, in scoring order
        self.loader = dataloader
        self.batches = list(dataloader)
        self.n = sum(len(b["input_ids"]) for b in self.batches)
        self.lengths = [int(x) for b in self.batches for x in b["attention_mask"].sum(1)]
        self.tokens_total = int(sum(b["attention_mask"].sum() for b in self.batches))
        self.tokens_spent = 0
        self.evaluations = 0
        self.order: list[int] | None = None
        self.memo: dict[str, Verdict] = {}  # judged candidates, by their unit sizes

    @property
    def weights(self) -> dict[str, torch.Tensor]:
        """Weights every candidate gets where they fit its levels (recovery's merged LoRA when
        the export is confirmed); the base model is always scored without them."""
        return self._weights

    @weights.setter
    def weights(self, value: dict[str, torch.Tensor]) -> None:
        self._weights = value
        self.memo.clear()  # verdicts are memoised on sizes: other weights, other verdicts

    def budget(self, target: float) -> float:
        """Most score a feasible candidate may lose (mean score ≥ target); for 0/1 scores,
        ``⌊n − target·n⌋`` errors."""
        return self.n - target * self.n + 1e-9

    def reorder(self, order: list[int]) -> None:
        """Score the examples in about this order from now on (indices into the split): each
        run of 4 batches is sorted by length, so batches pad little while the order holds at
        that grain (early rejection decides per batch round anyway)."""
        from torch.utils.data import DataLoader, Subset

        loader = self.loader
        chunk = 4 * (loader.batch_size or 1)
        self.order = [i for s in range(0, len(order), chunk)
                      for i in sorted(order[s:s + chunk], key=self.lengths.__getitem__)]
        self.batches = list(DataLoader(Subset(loader.dataset, self.order),
                                       batch_size=loader.batch_size, collate_fn=loader.collate_fn))

    def hardest_first(self, label: str = "search") -> list[float]:
        """Score the examples the base model gets wrong, then those it gets right by the
        smallest margin, first: pruned candidates fail there first, so early rejection and
        screening decide after fewer examples. Returns the base model's scores (split order)."""
        if self.measure is None and self.safety is None:  # the task's: one forward for both
            self.pruner.apply(1.0)
            graded = self._correct(None, None, None, self.lm.task.graded, label, columns=2)
            scores, safety = [g[0] for g in graded], [g[1] for g in graded]
        else:
            scores = self.correct(1.0, label=label)
            safety = self.correct(1.0, measure=self.safety or self.lm.task.confidence,
                                  label=label)
        if self.order is not None:  # scored in an earlier order: back to the split's order
            scores, safety = ([x for _, x in sorted(zip(self.order, xs))]
                              for xs in (scores, safety))
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

    @torch.no_grad()  # (not inference mode: units built here may get other weights later)
    def correct(self, keep, max_errors: float | None = None, *, until: int | None = None,
                prior: list[float] | None = None, measure=None,
                label: str = "search") -> list[float]:
        """Per-example scores (``measure``, default the task's score) in scoring order.

        Scoring stops at the first batch round after more than ``max_errors`` score is lost,
        or once ``until`` examples are scored; ``prior`` holds the scores of a first part
        already scored at these levels, which is continued rather than redone.
        """
        # the model stays at these levels: the next candidate rebuilds only the units it
        # changes (the search puts the model back at dense when it ends)
        self.pruner.apply(keep)
        with with_weights(self.pruner.model, self.pruner.fitting(self.weights)):
            return self._correct(max_errors, until, prior,
                                 measure or self.measure or self.lm.task.score, label)

    def _correct(self, max_errors, until, prior, measure, label: str,
                 columns: int = 1) -> list:
        """Per-example values in scoring order, gathered over ranks (``columns`` > 1: rows of
        that many values each, as lists)."""
        strategy = self.trainer.strategy
        world, rank, device = self.trainer.world_size, self.trainer.global_rank, strategy.root_device
        net = self.lm.place(device).eval()
        size = max(len(b["input_ids"]) for b in self.batches)
        scores: list = list(prior or [])
        first, done = 0, 0
        while done < len(scores):  # the rounds ``prior`` covers
            done += sum(len(b["input_ids"]) for b in self.batches[first:first + world])
            first += world
        if done != len(scores):
            raise ValueError("prior scores must end at a batch round")
        self.evaluations += 1
        bar = tqdm(total=self.n, initial=len(scores), desc=label, unit="example",
                   leave=False, disable=quiet(self.trainer))
        for start in range(first, len(self.batches), world):
            # NaN: no example; the last row carries the tokens this rank spent
            local = torch.full((size + 1, columns), float("nan"), dtype=torch.float64,
                               device=device)
            local[-1] = 0
            if start + rank < len(self.batches):
                batch = {k: v.to(device) if torch.is_tensor(v) else v
                         for k, v in self.batches[start + rank].items()}
                hits = measure(net, batch).double().reshape(-1, columns)
                local[:len(hits)] = hits
                local[-1, 0] = batch["attention_mask"].sum()
            gathered = (strategy.all_gather(local).reshape(-1, size + 1, columns) if world > 1
                        else local[None])
            self.tokens_spent += int(gathered[:, -1, 0].sum())
            rows = [r for r in gathered[:, :-1].flatten(0, 1).tolist() if r[0] == r[0]]
            new = [r[0] for r in rows] if columns == 1 else rows
            scores += new
            bar.update(len(new))
            if (max_errors is not None and self.early_reject and scores
                    and list(self.excess(scores))[-1] > max_errors):
                break
            if until is not None and len(scores) >= until:
                break
        bar.close()
        return scores

    def accuracy(self, keep, label: str = "search") -> float:
        """Mean score (the task's primary metric) of the candidate on the whole split."""
        return sum(self.correct(keep, label=label)) / self.n

    def _verdict(self, scores: list[float], budget: float) -> Verdict:
        over_at = next((i for i, spent in enumerate(self.excess(scores)) if spent > budget), None)
        return Verdict(over_at is None, over_at, len(scores),
                       sum(scores) / self.n if len(scores) == self.n else None)

    def judge(self, keep, budget: float, until: int | None = None,
              label: str = "search") -> Verdict:
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
                scores = self.correct(keep, budget, until=until, label=label)
                part = self.memo[key + "~"] = replace(self._verdict(scores, budget),
                                                      scores=scores, provisional=True)
            if part.feasible:
                return part
            scores = part.scores  # failed the screening: as final as a full scoring
        else:
            scores = self.correct(keep, budget, prior=part.scores if part else None,
                                  label=label)
        self.memo.pop(key + "~", None)
        verdict = self._verdict(scores, budget)
        if verdict.feasible and self.pool is not None:
            verdict = self._with_pool(keep, verdict, budget, label)
        self.memo[key] = verdict
        return verdict

    def _with_pool(self, keep, verdict: Verdict, budget: float, label: str) -> Verdict:
        """A candidate that holds the labelled split must also hold the pool, whose allowed
        loss per prompt is ``pool_share`` of the split's (``budget`` less the base model's lost
        score, per example). One that does not is infeasible, ranked above every labelled
        failure: its ``over_at`` is past the split's end by the share of the pool it got
        through."""
        allowed = (budget - Fitness.lost(self.base or [])) / self.n  # (base − target)
        pool = self.pool.judge(keep, self.pool_share * allowed * self.pool.n,
                               label=f"{label}: unlabeled pool")
        verdict = replace(verdict, pool=Verdict(pool.feasible, pool.over_at, pool.seen,
                                                pool.accuracy))
        if not pool.feasible:
            verdict = replace(verdict, feasible=False,
                              over_at=self.n - 1 + pool.over_at / max(self.pool.n, 1))
        return verdict

    @property
    def tokens(self) -> int:
        """Forward tokens spent, the pool's included."""
        return self.tokens_spent + (self.pool.tokens_spent if self.pool else 0)

    def state(self) -> dict:
        return {"tokens_spent": self.tokens_spent, "evaluations": self.evaluations,
                "memo": {key: v.record() for key, v in self.memo.items()}, "order": self.order, "base": self.base,
                **({"pool": self.pool.state()} if self.pool is not None else {})}

    def restore(self, state: dict) -> None:
        self.tokens_spent, self.evaluations = state["tokens_spent"], state["evaluations"]
        self.memo = {key: Verdict.from_record(v) for key, v in state["memo"].items()}
        self.base = state.get("base")
        if state["order"] is not None and state["order"] != self.order:
            self.reorder(state["order"])
        if self.pool is not None and "pool" in state:
            self.pool.restore(state["pool"])


class _WithReference(torch.utils.data.Dataset):
    """Pool rows, each with the dense model's answer (``reference``) for its batch."""

    def __init__(self, rows: list, references: torch.Tensor, collate):
        self.rows, self.references, self.prompts = rows, references, collate

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i], self.references[i]

    def collate(self, items) -> dict:
        from ..tasks.base import stack_rows

        batch = self.prompts([row for row, _ in items])
        batch["reference"] = stack_rows([ref[None] for _, ref in items])
        return batch


def pool_fitness(trainer, lm, pruner, data, examples: int = 0, early_reject: bool = True,
                 confidence: float = 0.0) -> Fitness:
    """The unlabeled pool (``data.pool_loader``, ``examples`` prompts spread over it; 0: all) as
    a Fitness whose score estimates, without labels, how right the pruned answer is where the
    dense one is right: 1 where it gives the dense answer, else ``1 − (p(a_dense) − p(a))``
    with ``p`` the dense model's own answer probabilities — a changed answer costs what the
    dense model itself would bet on it (a near tie, nothing; a confident answer, one whole
    example), so the lost score is the expected accuracy loss if the dense model's
    probabilities are calibrated. Tasks without a finite answer set (generation) score the
    agreement of the answers (token F1 with the dense model's). Scored hardest first: the
    prompts whose dense answer wins by the smallest margin."""
    from torch.utils.data import DataLoader

    from ..models.module import outputs

    task = lm.task
    loader = data.pool_loader(limit=examples or None)
    pruner.apply(1.0)
    first = next(iter(loader))
    with torch.no_grad():
        finite = task.answer_logprobs(lm.net.eval(), first) is not None
    if finite:
        references = outputs(trainer, lm.net, loader, task.answer_logprobs)  # dense log p
        top = references.topk(min(2, references.shape[1]), -1).values
        margins = (top[:, 0] - top[:, -1]).tolist()

        def measure(net, batch):
            dense = batch["reference"].to(batch["input_ids"].device).float().exp()
            ours = task.answer_logprobs(net, batch).argmax(-1)
            return 1 - (dense.max(-1).values - dense.gather(1, ours[:, None])[:, 0])
    else:
        references = outputs(trainer, lm.net, loader, task.reference)
        margins = [0.0] * len(references)

        def measure(net, batch):
            return task.agreement(net, batch, batch["reference"])
    rows = _WithReference(list(loader.dataset), references, loader.collate_fn)
    fitness = Fitness(trainer, lm, pruner,
                      DataLoader(rows, batch_size=loader.batch_size, collate_fn=rows.collate),
                      early_reject, confidence, measure=measure)
    fitness.reorder(sorted(range(fitness.n), key=margins.__getitem__))
    fitness.base = [1.0] * fitness.n  # the dense model agrees with itself
    return fitness
