"""The run folder: one folder per stage, fingerprinted, verified, and locked while a run writes.

``<root>/<name>/<stage>/`` holds each stage's artifacts and ``stage.json`` with the stage's
fingerprint (a hash of its own config section and of the fingerprints of the stages it reads:
``Stage.needs``, by default the stage just before it) and the
size and sha256 of every artifact. A stage is written to a temporary folder and renamed when
complete, so a finished-looking folder is always whole; a folder edited, truncated or damaged
since is noticed by its checksums and recomputed, and so is one replaced by a link or a file
(a damaged work folder or ``.lock`` is replaced, with a warning). Rerunning skips stages whose
fingerprint matches; a changed config re-runs that stage and every stage that reads it,
directly or through others (their fingerprints chain along ``needs``). Readers check a stage with :func:`verify`.
``<root>/<name>/.lock`` keeps a second run from writing the same folder at the same time.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PureWindowsPath
from typing import Callable

import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import SafetensorError

from .errors import SieveError, one_line, write_error
from .io import crash_point, file_digest, fingerprint, read_json, write_json

# what every process of one torchrun / SLURM / multi-node job shares, and another job does not
JOB_ENV = ("TORCHELASTIC_RUN_ID", "SLURM_JOB_ID", "SLURM_STEP_ID", "MASTER_ADDR", "MASTER_PORT")
LOCK_WAIT_S = 120.0  # how long other ranks wait for rank 0 to take the lock


def _job() -> str:
    return fingerprint({k: os.environ.get(k) for k in JOB_ENV})


@dataclass
class RunConfig:
    """Where the run lives.

    Args:
        name: run folder name under root.
        root: parent of run folders (a shared filesystem for multi-node runs).
        overwrite: let this run replace a run folder that holds another run (another model or
            calibration data); without it such a folder is refused, so nothing is lost by a
            reused name.
    """

    name: str = "demo"
    root: str = "checkpoints"
    overwrite: bool = False

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    @property
    def path(self) -> Path:
        return Path(self.root) / self.name

    def check(self) -> None:
        """``name`` must be one plain folder under ``root``: anything else writes elsewhere."""
        name = self.name
        if not name:
            raise SieveError("run.name is empty; name the run folder (e.g. --run.name demo)")
        if Path(name).is_absolute() or PureWindowsPath(name).is_absolute():
            raise SieveError(f"run.name {name!r} is an absolute path; it names a folder under "
                             f"run.root (set run.root for the location)")
        if "/" in name or "\\" in name:
            raise SieveError(f"run.name {name!r} contains a path separator; it names one folder "
                             f"under run.root (set run.root for the location)")
        if name in (".", ".."):
            raise SieveError(f"run.name {name!r} is not a folder name; name the run folder")
        if name.startswith("."):
            raise SieveError(f"run.name {name!r} starts with '.', which marks sieve-pl's hidden "
                             f"work folders; choose a name without it")


def _artifacts(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file a stage wrote (``stage.json`` excepted)."""
    return {p.relative_to(folder).as_posix(): file_digest(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p != folder / "stage.json"}


def _mismatch(folder: Path, files: dict) -> str | None:
    """The first artifact that is not what was written, with why; None when all are.

    Sizes first (free), checksums after: a truncated file is found without reading anything.
    """
    for rel, want in files.items():
        path = folder / rel
        if not path.is_file():
            return f"{rel} is missing"
        if path.stat().st_size != want["size"]:
            return f"{rel} does not match what was written (size)"
    for rel, want in files.items():
        if file_digest(folder / rel)["sha256"] != want["sha256"]:
            return f"{rel} does not match what was written (checksum)"
    return None


def _not_a_folder(path: Path) -> bool:
    """A link or a file where sieve-pl keeps a folder: never followed, written into or trusted."""
    return path.is_symlink() or (path.exists() and not path.is_dir())


def _remove(path: Path) -> None:
    """Remove a folder tree, a file or a link (never what a link points to); nothing if absent."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.is_symlink() or path.exists():
        path.unlink(missing_ok=True)


def verify(folder: Path) -> None:
    """Refuse, in one line, a finished stage folder whose files are not what the stage wrote:
    readers (``test``, ``validate``, ``measure``) score nothing they cannot vouch for."""
    if _not_a_folder(folder):
        raise SieveError(f"{folder} is not a folder (a link or a file); rerun `sieve-pl fit`")
    try:
        record = read_json(folder / "stage.json")
        problem = ("stage.json records no checksums (an older sieve-pl)" if "files" not in record
                   else _mismatch(folder, record["files"]))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        problem = f"stage.json is unreadable ({one_line(err)})"
    if problem:
        raise SieveError(f"{folder}: {problem}; rerun `sieve-pl fit` to rebuild it")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunDir:
    """One folder per stage, fingerprinted, written atomically by rank 0 and read by every rank."""

    def __init__(self, path: Path, trainer: L.Trainer):
        self.path, self.trainer = Path(path), trainer
        self.upstream = ""  # the fingerprint of the stage run last
        self.fingerprints: dict[str, str] = {}  # of every stage run so far
        self.timings: dict[str, float] = {}

    def _done(self, name: str, fp: str, final: Path) -> dict | None:
        """The stage's record when ``final`` holds what was written for ``fp``, else None.

        Every rank checks the same files on the shared filesystem, so all take one decision.
        A ``stage.json`` without ``files`` (older sieve-pl) is trusted as it was then.
        """
        if _not_a_folder(final):
            rank_zero_warn(f"[sieve-pl] {name}: {final} is not a folder (a link or a file); "
                           f"recomputing")
            return None
        marker = final / "stage.json"
        if not marker.exists():
            return None
        try:
            record = read_json(marker)
            if record["fingerprint"] != fp:
                return None
            float(record["seconds"])
            problem = _mismatch(final, record.get("files") or {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            problem = f"stage.json is unreadable ({type(err).__name__}: {err})"
        if problem:
            rank_zero_warn(f"[sieve-pl] {name}: {problem}; recomputing")
            return None
        return record

    def run(self, stage):
        """A :class:`~sieve_pl.stages.stage.Stage`: its results, computed or loaded."""
        config = stage.fingerprint()
        if stage.format != 1:  # (format 1 adds nothing: runs made before formats still match)
            config = {**config, "format": stage.format}
        return self.stage(stage.name, config, stage.run, stage.save, stage.load, stage.needs)

    def stage(self, name: str, config: dict, compute: Callable[[Path], object],
              save: Callable[[object, Path], None], load: Callable[[Path], object],
              needs: tuple[str, ...] | None = None):
        """Load the stage's artifacts if its fingerprint matches, else compute and save them.

        ``compute`` gets a work folder that survives a kill (for a stage's own checkpoints); it is
        emptied when the fingerprint changes and removed once the stage is complete. Artifacts
        that no longer match their checksums, or that fail to load, are recomputed.
        """
        upstream = self.upstream if needs is None else "+".join(
            self.fingerprints[n] for n in needs)  # (one need: that stage's, as a chain has)
        fp = fingerprint(name, config, upstream)
        self.upstream = self.fingerprints[name] = fp
        final = self.path / name
        record = self._done(name, fp, final)
        if record is not None:
            rank_zero_info(f"[sieve-pl] {name}: done earlier, loading {final}")
            try:
                loaded = load(final)
            except (SieveError, MemoryError):
                raise
            except Exception as err:  # damaged in a way the checksums could not see
                first = (str(err).splitlines() or [""])[0]
                rank_zero_warn(f"[sieve-pl] {name}: loading {final} failed "
                               f"({type(err).__name__}: {first}); recomputing")
            else:
                self.timings[name] = record["seconds"]
                return loaded
        work = self.path / f".{name}.work"
        try:
            if self.trainer.is_global_zero:
                self._prepare_work(name, work, fp)
            self.trainer.strategy.barrier()
            start = time.perf_counter()
            result = compute(work)
        except (OSError, SafetensorError) as err:  # disk full / quota / read-only in its work
            if not write_error(err):
                raise
            raise SieveError(f"the {name} stage could not write under {self.path} ({err}); "
                             f"free space or fix permissions and rerun to resume") from None
        crash_point(f"{name}:computed")
        if self.trainer.is_global_zero:
            tmp = final.with_name(f".{name}.tmp")
            _remove(tmp)
            try:
                tmp.mkdir(parents=True)
                save(result, tmp)
                crash_point(f"{name}:saved")  # artifacts written, not yet marked complete
                seconds = round(time.perf_counter() - start, 2)
                write_json(tmp / "stage.json", {"fingerprint": fp, "config": config,
                                                "seconds": seconds, "files": _artifacts(tmp)})
            except (OSError, SafetensorError) as err:  # disk full, quota, permissions:
                _remove(tmp)  # keep nothing half-written
                raise SieveError(f"writing the {name} stage to {self.path} failed ({err}); "
                                 f"nothing partial was kept: free space and rerun to resume "
                                 f"from this stage") from None
            _remove(final)
            os.replace(tmp, final)
            _remove(work)
        self.trainer.strategy.barrier()
        self.timings[name] = round(time.perf_counter() - start, 2)
        rank_zero_info(f"[sieve-pl] {name}: {self.timings[name]:.1f}s -> {final}")
        return load(final)  # every rank reads what rank 0 wrote

    @staticmethod
    def _prepare_work(name: str, work: Path, fp: str) -> None:
        """``work`` as a real folder holding only ``fp``'s work so far.

        Another fingerprint's work is emptied; a link or a file in its place (or an unreadable
        ``fingerprint``) is replaced with a warning, and the stage starts from scratch.
        """
        if _not_a_folder(work):
            rank_zero_warn(f"[sieve-pl] {name}: {work} is not a folder (a link or a file); "
                           f"replacing it and starting the stage from scratch")
            _remove(work)
        try:
            stale = (work / "fingerprint").read_text() != fp
        except FileNotFoundError:
            stale = False
        except (OSError, UnicodeDecodeError) as err:
            rank_zero_warn(f"[sieve-pl] {name}: {work / 'fingerprint'} is unreadable "
                           f"({type(err).__name__}); starting the stage from scratch")
            stale = True
        if stale:
            _remove(work)
        work.mkdir(parents=True, exist_ok=True)
        (work / "fingerprint").write_text(fp)

    @property
    def lock_path(self) -> Path:
        return self.path / ".lock"

    def acquire(self) -> None:
        """Take ``<run>/.lock`` (rank 0): two runs writing one folder would corrupt it.

        A lock left by a dead process on this host is replaced; one held by a live process, or
        by any process on another host (whose liveness cannot be checked), is refused. Other
        ranks wait for their rank 0's lock and refuse with the same line if another run keeps
        it, instead of waiting forever on a rank 0 that has exited.
        """
        if not self.trainer.is_global_zero:
            self._wait_for_rank_zero()
            return
        root = self.path.parent
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise SieveError(f"cannot write to {root}: {err}") from None
        try:
            self._create_lock()
            return
        except FileExistsError:
            pass
        except OSError as err:
            raise SieveError(f"cannot write to {root}: {err}") from None
        holder, lock = self._holder(), self.lock_path
        if lock.is_symlink() or (lock.exists() and not lock.is_file()):
            rank_zero_warn(f"[sieve-pl] {lock} is not a lock file (a folder or a link); "
                           f"replacing it")
        else:
            stale = (holder.get("host") == socket.gethostname()
                     and isinstance(holder.get("pid"), int) and not _alive(holder["pid"]))
            if not holder:  # unreadable: a writer killed between create and write, or mid-write
                stale = time.time() - self._lock_mtime() > 10
            if not stale:
                raise self._in_use(holder)
            rank_zero_warn(f"[sieve-pl] {lock}: replacing the stale lock of pid "
                           f"{holder.get('pid', '?')} (no longer running)")
        _remove(self.lock_path)
        try:
            self._create_lock()
        except FileExistsError:  # another run took it in between
            raise SieveError(f"{self.path} is in use by another run that started just now; wait "
                             f"for it or remove {self.lock_path} if that run is gone") from None
        except OSError as err:
            raise SieveError(f"cannot write to {root}: {err}") from None

    def _in_use(self, holder: dict) -> SieveError:
        return SieveError(f"{self.path} is in use by pid {holder.get('pid', '?')} on host "
                          f"{holder.get('host', '?')} since {holder.get('started', '?')}; "
                          f"wait for it or remove {self.lock_path} if that run is gone")

    def _wait_for_rank_zero(self) -> None:
        """Return once the lock is this job's (or there is none: rank 0 may be done already);
        refuse if another run holds it for ``LOCK_WAIT_S``, as rank 0 then has (rank 0 replaces
        a stale lock well within that). Under Lightning's own launcher rank 0 is our parent."""
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            holder = self._holder()
            if holder.get("job") == _job() or (holder.get("pid") == os.getppid()
                                               and holder.get("host") == socket.gethostname()):
                return
            if time.monotonic() > deadline:
                if self.lock_path.exists():
                    raise self._in_use(holder)
                return
            time.sleep(0.5)

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.trainer.is_global_zero and self._holder().get("pid") == os.getpid():
            self.lock_path.unlink(missing_ok=True)

    @contextmanager
    def lock(self):
        """Hold the run folder's lock for the ``with`` block, released on errors too."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()

    def _create_lock(self) -> None:
        fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        with os.fdopen(fd, "w") as handle:
            json.dump({"host": socket.gethostname(), "pid": os.getpid(), "job": _job(),
                       "started": time.strftime("%Y-%m-%d %H:%M:%S")}, handle)

    def _holder(self) -> dict:
        try:
            holder = read_json(self.lock_path)
        except (OSError, ValueError):
            return {}
        return holder if isinstance(holder, dict) else {}

    def _lock_mtime(self) -> float:
        try:
            return self.lock_path.stat().st_mtime
        except OSError:
            return 0.0
