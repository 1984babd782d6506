"""The task's data as a LightningDataModule with disjoint, deterministic splits."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from functools import partial

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import DataLoader, Dataset, Sampler

from ..errors import SieveError
from ..io import content_id
from .base import Task, field_text, field_value
from .classification import Classification
from .pool import PoolConfig, draw_source, usable
from .sources import BUILTIN_DATA, load_source

# in the order they are sliced from the shuffle: a split appended here leaves the examples (and
# the fingerprints) of those before it as they were
SPLITS = ("calibration", "validation", "test", "train", "confirmation")
DATA_FILES = ("*.json", "*.jsonl", "*.csv", "*.parquet", "*.arrow", "*.txt")  # of a data folder


@dataclass(frozen=True)
class SplitSizes:
    """Examples per split, drawn without overlap from one seeded shuffle of the source.

    Frozen: the signature's default instance is shared by every datamodule built without sizes.

    Args:
        calibration: examples whose activations give the projection statistics.
        validation: examples whose accuracy the search must keep within epsilon.
        test: examples for the final report only.
        train: examples for recovery fine-tuning (0 = none).
        confirmation: labelled examples that no selection ever reads (not the search, not a
            keep-gate, not early stopping, not a default): the final check of what was chosen
            on validation; recovery is exported only if it raises accuracy on it
            (``recover.keep_z``; 0 = none: recovery is judged on validation). Drawn after the
            other splits.
    """

    calibration: int = 256
    validation: int = 200
    test: int = 500
    train: int = 0
    confirmation: int = 0


class EpochShuffle(Sampler):
    """A shuffle that depends only on (seed, epoch): a resumed run sees the same order.

    Lightning calls ``set_epoch`` at the start of every epoch.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        # a generator: the order is drawn at the first index, not when the loader's iterator is
        # made (a resumed fit makes it before ``set_epoch``; batch_size=None loaders iterate
        # the sampler directly, without a BatchSampler's own lazy generator in between)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        yield from torch.randperm(self.n, generator=g).tolist()

    def __len__(self) -> int:
        return self.n


class Batches(Dataset):
    """Whole training batches, each of one kind: pool prompts with another model's outputs
    (``teacher`` rows) or labelled examples. Sampled by index, so an ``EpochShuffle`` (and
    DDP's sampler over it) orders batches, not examples."""

    def __init__(self, data: "TaskDataModule", parts: list[tuple[list[dict], object]]):
        self.data, self.parts = data, parts

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, index: int) -> dict:
        rows, teacher = self.parts[index]
        if teacher is None:
            return self.data.task.collate(rows, tokenizer=self.data.tokenizer,
                                          max_length=self.data.max_length)
        return {**self.data.pool_collate(rows), "teacher": teacher}


class TaskDataModule(L.LightningDataModule):
    """Task examples for every stage.

    Args:
        source: built-in name (``rotten_tomatoes``, ``drug_reviews``, ``drug_reviews_3class``),
            a local ``.json/.jsonl/.csv/.parquet`` file, or a hub dataset id (or a local folder
            laid out like one).
        name: hub dataset config name.
        split: hub split to draw every split from.
        task: the task kind (``Classification``, ``MultipleChoice``, ``Generation``), its prompt
            and the columns it reads (the field mapping); none: ``Classification()``, the
            Rotten Tomatoes sentiment prompt.
        sizes: examples per split.
        batch_size: examples per forward pass.
        max_length: prompts longer than this many tokens are truncated on the left (answers
            are appended after the prompt).
        seed: seed of the shuffle that defines the splits.
        label_map: renames values of the task's label (or answer) column before anything
            else (``{positive: fresh, negative: rotten}`` scores another sentiment set with
            this task's label words); values not in the map are kept.
        pool: unlabeled prompts (text only) for fidelity to the dense model and distillation:
            the task's calibration / train prompts, an unlabeled source, sister datasets.
        chat_template: format every prompt as a user turn through the tokenizer's chat
            template, with the assistant's turn opened (instruct models); calibration, scoring,
            recovery and the model card all see it. False: the raw prompt.
    """

    def __init__(
        self,
        source: str = "rotten_tomatoes",
        name: str | None = None,
        split: str = "train",
        task: Task | None = None,
        sizes: SplitSizes = SplitSizes(),
        batch_size: int = 16,
        max_length: int = 256,
        seed: int = 0,
        label_map: dict[str, str] | None = None,
        pool: PoolConfig = PoolConfig(),
        chat_template: bool = False,
    ):
        super().__init__()
        self.chat_template = chat_template
        self.source, self.name, self.split = source, name, split
        self.label_map = dict(label_map or {})
        # the default is built here, not given as a lazy_instance: jsonargparse keeps a default
        # instance's arguments (``prompt``) when a config switches the class to another kind
        self.task = task if task is not None else Classification()
        self.sizes, self.batch_size, self.max_length, self.seed = sizes, batch_size, max_length, seed
        self.pool_config = pool
        self.check_settings()
        self.tokenizer = None
        self.splits: dict = {}
        self._others: dict[tuple, TaskDataModule] = {}  # other_source's, built once each
        self._held_out: dict[str, int] = {}  # rows other_source reports, per source: not pooled
        self._held_prompts: set[str] = set()  # and their prompts
        self._pool: tuple[list[dict], list[str]] | None = None  # rows and where each came from

    def fingerprint_config(self, split: str) -> dict:
        """What one split's examples depend on, for stage fingerprints.

        Splits are consecutive slices of one shuffle, so a split depends on its own size and on
        the sizes of the splits before it, not on those after it. A local data file (or folder)
        is in it by content (``source_files``): an edited file under the same name is new data.
        """
        before = SPLITS[:SPLITS.index(split) + 1]
        extra = {"label_map": self.label_map} if self.label_map else {}
        files = {} if self.source in BUILTIN_DATA else content_id(self.source, DATA_FILES)
        if files:
            extra["source_files"] = files
        return {"source": self.source, "name": self.name, "split": self.split, **extra,
                "task": self.task.config(), "max_length": self.max_length, "seed": self.seed,
                "sizes": {s: getattr(self.sizes, s) for s in before}}

    def pool_fingerprint(self) -> dict:
        """What the pool's prompts depend on, for the fingerprints of the stages that read it:
        its settings, the labelled splits it takes prompts from (or skips), the transfer rows
        it leaves out, and local files by content."""
        config = self.pool_config
        out = {"pool": asdict(config), "source": self.source, "seed": self.seed,
               "task": self.task.config(), "max_length": self.pool_max_length,
               "held_out": dict(sorted(self._held_out.items()))}
        if config.splits:
            out["splits"] = self.fingerprint_config(max(config.splits, key=SPLITS.index))
        if self.source in config.sisters:  # starts after every labelled split
            out["after"] = self.fingerprint_config(SPLITS[-1])
        files = {s: content_id(s, DATA_FILES) for s in [config.unlabeled, *config.sisters]
                 if s and s not in BUILTIN_DATA}
        if any(files.values()):
            out["source_files"] = {s: f for s, f in files.items() if f}
        return out

    @property
    def pool_max_length(self) -> int:
        return self.pool_config.max_length or self.max_length

    def check_settings(self) -> None:
        """Fail at construction (config parsing), not as a DataLoader or collate traceback
        after the weights are loaded: 8 tokens is the least room for a prompt and an answer."""
        if self.batch_size < 1:
            raise SieveError(f"data.batch_size must be >= 1, got {self.batch_size}")
        if self.max_length < 8:
            raise SieveError(f"data.max_length must be >= 8 tokens, got {self.max_length}")
        self.pool_config.check()

    def prepare(self, tokenizer) -> None:
        """Load, check and split the data (cheap; runs before any model weight is loaded)."""
        if self.splits:
            return
        self.check_settings()  # (settings may have been changed since construction)
        self.tokenizer = tokenizer
        if self.chat_template and not getattr(tokenizer, "chat_template", None):
            raise SieveError("data.chat_template is true but this model's tokenizer has no chat "
                             "template (a base model, not an instruct one): set it to false")
        self.task.chat_template = self.chat_template
        data = load_source(self.source, self.name, self.split)
        if self.label_map:
            data = self._relabel(data)
        self.task.check(data, tokenizer)
        wanted = [(s, getattr(self.sizes, s)) for s in SPLITS]
        if any(n < 0 for _, n in wanted) or self.sizes.test < 1:
            raise SieveError(f"split sizes must be >= 0 and test >= 1, got {asdict(self.sizes)}")
        total = sum(n for _, n in wanted)
        if total > len(data):
            raise SieveError(f"splits need {total} examples ({asdict(self.sizes)}) but "
                             f"{self.source!r} has {len(data)}")
        data = data.shuffle(seed=self.seed)
        start = 0
        for split, n in wanted:
            # (an empty range at the very end is not a valid contiguous selection)
            self.splits[split] = data.select(range(start, start + n) if n else [])
            start += n
        self._check_rows()
        for split in ("validation", "test", "confirmation"):  # scored in batches: similar
            self.splits[split] = self._by_length(self.splits[split])  # lengths pad less

    def _check_rows(self) -> None:
        """Refuse a row whose prompt field is null (it would be prompted as ``Review: None``);
        warn, before calibration, about splits that measure little: empty prompt texts, one
        class only in a labelled split, the same prompt in two splits (calibrated or trained
        on, then scored as if unseen)."""
        fields = self.task.prompt_fields()
        first: dict[tuple, str] = {}
        empty, shared = 0, set()
        for split in SPLITS:
            for i, row in enumerate(self.splits[split]):
                for field in fields:
                    if field_value(row, field) is None:
                        raise SieveError(f"data: row {i} of the {split} split has no {field!r} "
                                         f"(null); drop or fill such rows of {self.source}")
                texts = tuple(field_text(row, f) for f in fields)
                empty += any(not t.strip() for t in texts)
                if first.setdefault(texts, split) != split:
                    shared.add((first[texts], split))
        if empty:
            rank_zero_warn(f"[sieve-pl] data: {empty} examples have an empty prompt text")
        if shared:
            pairs = ", ".join(f"{a}/{b}" for a, b in sorted(shared))
            rank_zero_warn(f"[sieve-pl] data: the same prompt text is in more than one split "
                           f"({pairs}): a split's score is not of unseen examples; deduplicate "
                           f"{self.source}")
        if isinstance(self.task, Classification):  # (calibration needs no labels)
            single = {}
            for split in SPLITS[1:]:
                found = {str(field_value(r, self.task.label_field)) for r in self.splits[split]}
                if len(self.splits[split]) > 1 and len(found) == 1:
                    single[split] = found.pop()
            if single:
                rank_zero_warn(f"[sieve-pl] data: one class only in "
                               f"{', '.join(f'{k} ({v!r})' for k, v in single.items())}: its "
                               f"accuracy cannot tell the model from a constant answer")

    def _by_length(self, data):
        """The split, shortest prompt first. Batches of a random order pad to 1.7x the real
        tokens on the demo; sorted, scoring costs little more than the tokens. Its metrics
        do not depend on order; subsets (``loader(limit=)``) are spread over the lengths."""
        collate = partial(self.task.collate, tokenizer=self.tokenizer, max_length=self.max_length)
        lengths = [int(collate([example])["attention_mask"].sum()) for example in data]
        return data.select(sorted(range(len(data)), key=lengths.__getitem__)) if len(data) else data

    def _relabel(self, data):
        column = getattr(self.task, "label_field", None) or getattr(self.task, "answer_field",
                                                                    None)
        if not isinstance(column, str):
            raise SieveError(f"data.label_map needs a task with one label_field or "
                             f"answer_field column; {type(self.task).__name__} has none")
        if column not in data.column_names:
            return data  # the task's own check names the missing column
        mapping = self.label_map
        return data.map(lambda e: {column: mapping.get(str(e[column]), e[column])})

    def other_source(self, source: str, label_map: dict[str, str] | None,
                     examples: int) -> "TaskDataModule":
        """The same task on another dataset: ``examples`` test examples (cross-dataset check).

        Built once per (source, label_map, examples): a run checks it before any weight loads
        and scores it at the end, and a hub dataset is not worth loading again.

        Its rows are held out of the pool (``pool``): they are the first ``examples`` rows of
        the source shuffled with ``data.seed``, and a sister pool of the same source starts
        after them.
        """
        key = (source, tuple(sorted((label_map or {}).items())), examples)
        if key not in self._others:
            other = TaskDataModule(source, task=self.task, sizes=SplitSizes(0, 0, examples, 0),
                                   batch_size=self.batch_size, max_length=self.max_length,
                                   seed=self.seed, label_map=label_map,
                                   chat_template=self.chat_template)
            other.prepare(self.tokenizer)
            if self._pool is not None and examples > self._held_out.get(source, 0):
                raise RuntimeError(f"the pool was built before {source!r}'s {examples} transfer "
                                   f"rows were held out of it: call other_source first")
            self._held_out[source] = max(self._held_out.get(source, 0), examples)
            self._held_prompts |= {self.task.prompt_text(e) for e in other.splits["test"]}
            self._others[key] = other
        return self._others[key]

    def pool(self) -> list[dict]:
        """The unlabeled prompts (rows holding the task's prompt fields only), shortest prompt
        first: every ``data.pool.splits`` split's rows, then ``unlabeled``'s, then each
        sister's (see ``sieve_pl.tasks.pool`` for what is left out), sorted by length. Built
        once, after ``prepare`` and the ``other_source`` calls whose rows it must leave out."""
        if self._pool is None:
            if not self.splits:
                raise RuntimeError("call prepare(tokenizer) first")
            config, held = self.pool_config, self._held_prompts
            parts = [(split, usable(self.task, self.splits[split], held))
                     for split in config.splits]
            if config.unlabeled:
                parts.append(("unlabeled", draw_source(
                    self.task, config.unlabeled, self.seed, held, 0, config.unlabeled_examples,
                    f"data.pool.unlabeled {config.unlabeled!r}")))
            for source, n in config.sisters.items():
                skip = self._held_out.get(source, 0)
                if source == self.source:  # the task's own data: after every labelled split
                    skip = max(skip, sum(getattr(self.sizes, s) for s in SPLITS))
                parts.append((source, draw_source(self.task, source, self.seed, held, skip, n,
                                                  f"data.pool.sisters {source!r}")))
            rows = [(row, origin) for origin, part in parts for row in part]
            texts = [self.task.prompt_text(row) for row, _ in rows]
            lengths = [len(ids) for ids in self.tokenizer(
                texts, truncation=True, max_length=self.pool_max_length)["input_ids"]] \
                if texts else []
            order = sorted(range(len(rows)), key=lengths.__getitem__)
            self._pool = ([rows[i][0] for i in order], [rows[i][1] for i in order])
        return self._pool[0]

    def pool_origins(self) -> list[str]:
        """Where each pool row came from (a split name, ``unlabeled`` or the sister source),
        in ``pool()`` order: agreement can be reported per origin."""
        self.pool()
        return self._pool[1]

    def pool_collate(self, examples: list[dict]) -> dict:
        """A batch of pool prompts: no labels (``collate(..., labelled=False)``)."""
        return self.task.collate(examples, tokenizer=self.tokenizer,
                                 max_length=self.pool_max_length, labelled=False)

    def pool_loader(self, limit: int | None = None, batch_size: int | None = None,
                    outside: bool = False) -> DataLoader:
        """Batches of pool prompts without labels, in ``pool()`` order (by length, so batches
        pad little; ``limit`` prompts spread evenly over it, if given). ``outside``: only the
        prompts from outside the task's own splits (unlabeled, sisters)."""
        rows = self.pool()
        if outside:
            rows = [r for r, o in zip(rows, self.pool_origins()) if o not in SPLITS]
        if limit is not None and limit < len(rows):
            rows = [rows[i * len(rows) // limit] for i in range(limit)]
        return DataLoader(rows, batch_size=batch_size or self.batch_size,
                          collate_fn=self.pool_collate)

    def training_loader(self, teacher=None, batch_size: int | None = None,
                        labelled: bool = True, seed: int = 0) -> DataLoader:
        """Training batches of one kind each: the pool in its (length-sorted) order, chunked,
        each chunk with its rows of ``teacher`` (per pool prompt, e.g. ``task.teacher`` of the
        dense model) when given; the train split's labelled examples, sorted by prompt length
        and chunked, when ``labelled``. Similar lengths pad little; the batches' order is
        shuffled per epoch (``seed``; the same after a resume)."""
        size = batch_size or self.batch_size
        parts = []
        if teacher is not None:
            rows = self.pool()
            parts += [(rows[i:i + size], teacher[i:i + size]) for i in range(0, len(rows), size)]
        if labelled and len(self.splits["train"]):
            train = list(self.splits["train"])
            lengths = [len(ids) for ids in self.tokenizer(
                [self.task.prompt_text(e) for e in train], truncation=True,
                max_length=self.max_length)["input_ids"]]
            train = [train[i] for i in sorted(range(len(train)), key=lengths.__getitem__)]
            parts += [(train[i:i + size], None) for i in range(0, len(train), size)]
        return DataLoader(Batches(self, parts), batch_size=None,
                          sampler=EpochShuffle(len(parts), seed))

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            raise RuntimeError("call prepare(tokenizer) first")

    def loader(self, split: str, shuffle: bool = False, limit: int | None = None) -> DataLoader:
        """Batches of one split (``limit`` examples spread evenly over it, if given: the
        scored splits are sorted by length, so their first examples are the shortest)."""
        data = self.splits[split]
        if limit is not None and limit < len(data):
            data = data.select([i * len(data) // limit for i in range(limit)])
        collate = partial(self.task.collate, tokenizer=self.tokenizer, max_length=self.max_length)
        sampler = EpochShuffle(len(data), self.seed) if shuffle else None
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler, collate_fn=collate)

    def train_dataloader(self):
        return self.loader("train", shuffle=True)

    def calibration_dataloader(self):
        return self.loader("calibration")

    def confirmation_dataloader(self):
        """The confirmation split: labelled, never read by any selection (search, keep-gates,
        early stopping, defaults); only the final checks and the report score it."""
        return self.loader("confirmation")

    def val_dataloader(self):
        return self.loader("validation")

    def test_dataloader(self):
        return self.loader("test")
