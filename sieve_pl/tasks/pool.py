"""Unlabeled prompt pools: the task's own text and sister datasets, text only.

Fidelity to the dense model (does the pruned model give the dense model's answers?) and
recovery's distillation need prompts, not labels, so they can read far more examples than the
labelled splits hold: the calibration and train prompts, a user's unlabeled file, and other
datasets of the same task (*sisters*). The DataModule builds the pool (``TaskDataModule.pool``);
this module says what goes in it.

What the pool never holds (DESIGN.md, "What selection may read"):

* a row of the validation, test or confirmation splits: only ``splits`` (calibration, train)
  are taken from the task's own data, and a sister that is ``data.source`` itself starts after
  every labelled split's rows;
* a row a transfer check reports (``transfer.sources``): ``TaskDataModule.other_source`` draws
  the first ``examples`` rows of a source shuffled with ``data.seed``; a sister draws from the
  same shuffle starting after them, rows ``[examples, examples + n)``, and any row whose prompt
  equals a reported one (duplicate texts, or the same texts under another source name such as
  ``drug_reviews_3class``) is skipped too.

Rows whose prompt fields are empty are skipped. The pool has no seed of its own: its draws
follow ``data.seed`` (one seed is one data draw), the seed the transfer rows are drawn with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import SieveError
from .base import Task, column_of
from .sources import load_source


@dataclass(frozen=True)
class PoolConfig:
    """Unlabeled prompts for fidelity to the dense model and for distillation (text only).

    Frozen: the signature's default instance is shared by every datamodule built without one.

    Args:
        splits: the task's own splits whose prompts join the pool (labels not read); the
            validation, test and confirmation splits never do.
        unlabeled: a data source (built-in name, local .json/.jsonl/.csv/.parquet file or hub
            id) whose rows give prompts through the task's prompt fields (classification: the
            text field); labels, if any, are ignored. None: no such source.
        unlabeled_examples: rows drawn from ``unlabeled`` (shuffled with data.seed); 0 = all.
        sisters: other datasets of the same task, text only: source -> prompts drawn from it
            (0 = every usable row). Drawn from the shuffle (data.seed) the transfer check
            draws from, after its rows: rows [transfer.examples, transfer.examples + n) of a
            source that is also in transfer.sources, so the pool never holds a reported row.
        max_length: pool prompts longer than this many tokens are truncated on the left; 0 =
            data.max_length. Every pass over the pool costs its tokens (drug reviews average
            115 tokens, Rotten Tomatoes snippets 31).
    """

    splits: list[Literal["calibration", "train"]] = field(
        default_factory=lambda: ["calibration", "train"])
    unlabeled: str | None = None
    unlabeled_examples: int = 0
    sisters: dict[str, int] = field(default_factory=dict)
    max_length: int = 0

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    def check(self) -> None:
        if self.unlabeled_examples < 0:
            raise SieveError(f"data.pool.unlabeled_examples must be >= 0, got "
                             f"{self.unlabeled_examples}")
        bad = {s: n for s, n in self.sisters.items() if not isinstance(n, int) or n < 0}
        if bad:
            raise SieveError(f"data.pool.sisters must map sources to example counts >= 0, got "
                             f"{bad}")
        if self.max_length and self.max_length < 8:
            raise SieveError(f"data.pool.max_length must be 0 or >= 8 tokens, got "
                             f"{self.max_length}")
        unknown = [s for s in self.splits if s not in ("calibration", "train")]
        if unknown:
            raise SieveError(f"data.pool.splits may name calibration and train only, got "
                             f"{unknown}")


def prompt_row(task: Task, example: dict) -> dict:
    """The columns of a row that the task's prompt reads (the rest, labels included, dropped:
    rows of different sources then share one shape)."""
    return {c: example[c] for c in dict.fromkeys(column_of(f, example)
                                                 for f in task.prompt_fields())}


def usable(task: Task, rows, held: set[str], n: int = 0) -> list[dict]:
    """Up to ``n`` (0: all) prompt rows of ``rows``, in order, without empty prompts or
    prompts in ``held`` (the rows other checks report)."""
    taken = []
    for example in rows:
        if not task.has_prompt(example) or task.prompt_text(example) in held:
            continue
        taken.append(prompt_row(task, example))
        if n and len(taken) == n:
            break
    return taken


def draw_source(task: Task, source: str, seed: int, held: set[str], skip: int, n: int,
                what: str) -> list[dict]:
    """``n`` usable rows of a source shuffled with ``seed``, from row ``skip`` on."""
    data = load_source(source)
    task.check_prompts(data, what)
    shuffled = data.shuffle(seed=seed)
    rest = shuffled.select(range(skip, len(data))) if skip < len(data) else []
    rows = usable(task, rest, held, n)
    if n and len(rows) < n:
        raise SieveError(f"{what} wants {n} prompts but {source!r} has only {len(rows)} usable "
                         f"rows after its first {skip} (held out: transfer check or labelled "
                         f"splits) of {len(data)}")
    return rows
