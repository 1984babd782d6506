"""The confirmation split and the unlabeled pools: what they hold and what they never hold."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest

from sieve_pl.errors import SieveError
from sieve_pl.tasks import SplitSizes, TaskDataModule
from sieve_pl.tasks.pool import PoolConfig

LABELS = {"positive": "fresh", "negative": "rotten"}
SIZES = SplitSizes(calibration=8, validation=6, test=6, train=4)


def texts(rows) -> set[str]:
    return {r["text"] for r in rows}


def module(tokenizer, sizes=SIZES, **kwargs) -> TaskDataModule:
    data = TaskDataModule(sizes=sizes, batch_size=4, **kwargs)
    data.prepare(tokenizer)
    return data


def test_confirmation_split_comes_last_and_changes_no_other_split(tokenizer):
    before = module(tokenizer)
    after = module(tokenizer, replace(SIZES, confirmation=10))
    for split in ("calibration", "validation", "test", "train"):
        assert list(after.splits[split]) == list(before.splits[split])
        # existing runs' fingerprints stay valid
        assert after.fingerprint_config(split) == before.fingerprint_config(split)
        assert "confirmation" not in after.fingerprint_config(split)["sizes"]
    confirmation = after.splits["confirmation"]
    assert len(confirmation) == 10 and len(before.splits["confirmation"]) == 0
    others = set().union(*(texts(after.splits[s]) for s in ("calibration", "validation",
                                                             "test", "train")))
    assert not texts(confirmation) & others
    assert after.fingerprint_config("confirmation")["sizes"]["confirmation"] == 10
    batches = list(after.confirmation_dataloader())
    assert sum(len(b["labels"]) for b in batches) == 10  # labelled
    widths = [int(b["attention_mask"].sum(1).max()) for b in batches]
    assert widths == sorted(widths)  # scored split: sorted by length


@pytest.mark.parametrize("confirmation,message", [
    (-1, "split sizes must be >= 0"), (20000, "splits need 20024 examples")])
def test_confirmation_size_errors(tokenizer, confirmation, message):
    with pytest.raises(SieveError, match=message):
        module(tokenizer, replace(SIZES, confirmation=confirmation))


def test_default_pool_is_the_calibration_and_train_prompts(tokenizer):
    data = module(tokenizer)
    rows = data.pool()
    assert texts(rows) == texts(data.splits["calibration"]) | texts(data.splits["train"])
    assert all(set(r) == {"text"} for r in rows)  # labels are not carried
    assert sorted(data.pool_origins()) == ["calibration"] * 8 + ["train"] * 4
    batches = list(data.pool_loader())
    assert all("labels" not in b for b in batches)
    assert sum(len(b["input_ids"]) for b in batches) == 12
    lengths = [int(n) for b in batches for n in b["attention_mask"].sum(1)]
    assert lengths == sorted(lengths)  # shortest first, deterministic
    again = module(tokenizer)
    assert again.pool() == rows
    assert len(data.pool_loader(limit=5).dataset) == 5
    assert module(tokenizer, pool=PoolConfig(splits=["train"])).pool_origins() == ["train"] * 4


def test_sister_pool_is_disjoint_from_the_transfer_rows(tokenizer):
    data = module(tokenizer, pool=PoolConfig(sisters={"drug_reviews": 40,
                                                      "drug_reviews_3class": 40}))
    transfer = data.other_source("drug_reviews", LABELS, 30)  # as fit does, before the pool
    reported = texts(transfer.splits["test"])
    pooled = {r["text"] for r, o in zip(data.pool(), data.pool_origins()) if o != "calibration"
              and o != "train"}
    assert len(pooled) >= 79 and not pooled & reported  # (one duplicate text across sources)
    # the drug_reviews sister is the same shuffle's next rows: [30, 30 + 40) but for repeats
    from sieve_pl.tasks.sources import load_source

    shuffled = load_source("drug_reviews").shuffle(seed=0)
    sister = [r["text"] for r, o in zip(data.pool(), data.pool_origins()) if o == "drug_reviews"]
    following = set(shuffled["text"][30:90])
    assert len(sister) == 40 and set(sister) <= following
    assert set(shuffled["text"][:30]) == reported
    assert data.pool_fingerprint()["held_out"] == {"drug_reviews": 30}


def test_transfer_rows_must_be_held_out_before_the_pool_is_built(tokenizer):
    data = module(tokenizer, pool=PoolConfig(sisters={"drug_reviews": 10}))
    data.pool()
    with pytest.raises(RuntimeError, match="call other_source first"):
        data.other_source("drug_reviews", LABELS, 30)


def test_a_sister_with_too_few_rows_fails_in_one_line(tokenizer):
    data = module(tokenizer, pool=PoolConfig(sisters={"drug_reviews": 880}))
    data.other_source("drug_reviews", LABELS, 30)
    with pytest.raises(SieveError, match=r"data.pool.sisters 'drug_reviews' wants 880 prompts "
                                         r"but 'drug_reviews' has only \d+ usable rows after "
                                         r"its first 30"):
        data.pool()
    every = module(tokenizer, pool=PoolConfig(splits=[], sisters={"drug_reviews": 0}))
    every.other_source("drug_reviews", LABELS, 30)
    assert 800 < len(every.pool()) < 889 - 30 + 1  # 0: every usable row after the held-out ones


def test_the_tasks_own_source_as_a_sister_starts_after_every_split(tokenizer):
    sizes = replace(SIZES, confirmation=5)
    data = module(tokenizer, sizes, pool=PoolConfig(splits=[], sisters={"rotten_tomatoes": 50}))
    from sieve_pl.tasks.sources import load_source

    shuffled = load_source("rotten_tomatoes").shuffle(seed=0)["text"]
    assert texts(data.pool()) <= set(shuffled[29:29 + 60])  # the 29 labelled rows come first
    labelled = set().union(*(texts(split) for split in data.splits.values()))
    assert not texts(data.pool()) & labelled
    assert "after" in data.pool_fingerprint()


def test_unlabeled_file_gives_prompts_and_skips_empty_rows(tokenizer, tmp_path):
    path = tmp_path / "reviews.jsonl"
    rows = [{"text": "an unlabeled review"}, {"text": ""}, {"text": None},
            {"text": "another one", "label": "not a known label"}, {"text": "   "}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = module(tokenizer, pool=PoolConfig(splits=[], unlabeled=str(path)))
    assert texts(data.pool()) == {"an unlabeled review", "another one"}
    assert data.pool_origins() == ["unlabeled"] * 2
    first = data.pool_fingerprint()
    assert str(path) in first["source_files"]
    path.write_text(json.dumps({"text": "edited"}) + "\n")
    assert module(tokenizer, pool=PoolConfig(splits=[], unlabeled=str(path))
                  ).pool_fingerprint() != first
    limited = module(tokenizer, pool=PoolConfig(splits=[], unlabeled=str(path),
                                                unlabeled_examples=1))
    assert len(limited.pool()) == 1
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"review": "x"}) + "\n")
    with pytest.raises(SieveError, match="data.pool.unlabeled .* has no column 'text'; "
                                         "columns: review"):
        module(tokenizer, pool=PoolConfig(unlabeled=str(wrong))).pool()


def test_pool_prompts_are_cut_to_the_pool_max_length(tokenizer):
    data = module(tokenizer, pool=PoolConfig(sisters={"drug_reviews": 8}, max_length=24))
    batches = list(data.pool_loader())
    assert max(b["input_ids"].shape[1] for b in batches) == 24
    assert data.pool_fingerprint()["max_length"] == 24


def test_pool_fingerprint_follows_what_the_pool_reads(tokenizer):
    base = module(tokenizer).pool_fingerprint()
    assert module(tokenizer).pool_fingerprint() == base
    # train's rows follow test's; the confirmation split comes after both
    assert module(tokenizer, replace(SIZES, test=7)).pool_fingerprint() != base
    assert module(tokenizer, replace(SIZES, confirmation=7)).pool_fingerprint() == base
    assert module(tokenizer, seed=1).pool_fingerprint() != base
    assert module(tokenizer, pool=PoolConfig(sisters={"drug_reviews": 5})
                  ).pool_fingerprint() != base


@pytest.mark.parametrize("kwargs,message", [
    ({"sisters": {"drug_reviews": -1}}, "data.pool.sisters must map sources to example counts"),
    ({"max_length": 4}, "data.pool.max_length must be 0 or >= 8"),
    ({"unlabeled_examples": -2}, "data.pool.unlabeled_examples must be >= 0"),
    ({"splits": ["test"]}, "data.pool.splits may name calibration and train only"),
])
def test_pool_config_errors(kwargs, message):
    with pytest.raises(SieveError, match=message):
        PoolConfig(**kwargs)
