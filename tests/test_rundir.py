"""The run folder: skip-if-done with verified artifacts, the run lock, run names, content ids.

No model is loaded: stages write small text files and the trainer is a stand-in.
"""
import json
import os
import socket
import subprocess
import threading
import time
from dataclasses import asdict
from pathlib import PurePosixPath
from types import SimpleNamespace

import pytest

from sieve_pl import rundir
from sieve_pl.errors import SieveError
from sieve_pl.io import content_id, fingerprint, write_json
from sieve_pl.rundir import RunConfig, RunDir


def fake_trainer(rank0: bool = True):
    return SimpleNamespace(is_global_zero=rank0, strategy=SimpleNamespace(barrier=lambda: None))


def run_stage(path, value="42", config=None, calls=None):
    """One stage writing ``value.txt`` (and ``sub/extra.json``); counts computations."""
    calls = calls if calls is not None else []

    def compute(work):
        calls.append(value)
        return value

    def save(result, folder):
        (folder / "value.txt").write_text(result)
        (folder / "sub").mkdir()
        (folder / "sub" / "extra.json").write_text(json.dumps({"v": result}))

    return RunDir(path, fake_trainer()).stage("stage", config or {"a": 1}, compute, save,
                                              lambda d: (d / "value.txt").read_text())


def test_stage_records_files_and_is_skipped_when_unchanged(tmp_path):
    calls = []
    assert run_stage(tmp_path, calls=calls) == "42"
    record = json.loads((tmp_path / "stage" / "stage.json").read_text())
    assert set(record["files"]) == {"value.txt", "sub/extra.json"}
    assert record["files"]["value.txt"]["size"] == 2
    assert run_stage(tmp_path, calls=calls) == "42"
    assert calls == ["42"]
    assert run_stage(tmp_path, config={"a": 2}, calls=calls) == "42"  # changed config
    assert len(calls) == 2


def test_a_stage_reruns_only_when_a_stage_it_needs_changed(tmp_path):
    """Fingerprints chain along ``needs``: c reads a only, so b's change leaves c alone, while
    a's change re-runs both; without ``needs`` a stage reads the one before it."""
    calls = []

    def run(a, b):
        run_dir = RunDir(tmp_path, fake_trainer())
        for name, config, needs in [("a", {"v": a}, None), ("b", {"v": b}, None),
                                    ("c", {}, ("a",))]:
            run_dir.stage(name, config, lambda work, n=name: calls.append(n) or n,
                          lambda result, folder: (folder / "r.txt").write_text(result),
                          lambda folder: (folder / "r.txt").read_text(), needs)

    run(1, 1)
    assert calls == ["a", "b", "c"]
    run(1, 2)
    assert calls[3:] == ["b"]
    run(2, 2)
    assert calls[4:] == ["a", "b", "c"]


def test_a_stage_whose_result_format_changes_is_recomputed(tmp_path):
    """Stage.format: code that gives other results for the same settings (a fixed formula)
    recomputes finished stages; format 1 leaves the fingerprints of older runs as they were."""
    from sieve_pl.stages.stage import Stage

    calls = []

    class Counting(Stage):
        name = "counting"

        def fingerprint(self):
            return {"a": 1}

        def run(self, work):
            calls.append(self.format)
            return str(self.format)

        def save(self, result, folder):
            (folder / "value.txt").write_text(result)

        def load(self, folder):
            return (folder / "value.txt").read_text()

    class Fixed(Counting):
        format = 2

    assert RunDir(tmp_path, fake_trainer()).run(Counting()) == "1"
    assert RunDir(tmp_path, fake_trainer()).run(Counting()) == "1"  # loaded
    assert RunDir(tmp_path, fake_trainer()).run(Fixed()) == "2"  # recomputed
    assert RunDir(tmp_path, fake_trainer()).run(Fixed()) == "2"
    assert calls == [1, 2]
    record = json.loads((tmp_path / "counting" / "stage.json").read_text())
    assert record["fingerprint"] == fingerprint("counting", {"a": 1, "format": 2}, "")


@pytest.mark.parametrize("damage,why", [
    (lambda f: f.write_text("4"), "size"),  # truncated
    (lambda f: f.write_text("43"), "checksum"),  # same size, other bytes
    (lambda f: f.unlink(), "missing"),
])
def test_damaged_artifact_is_recomputed_with_a_warning(tmp_path, damage, why):
    calls = []
    run_stage(tmp_path, calls=calls)
    damage(tmp_path / "stage" / "value.txt")
    with pytest.warns(UserWarning, match=rf"\[sieve-pl\] stage: value.txt .*{why}.*recomputing"):
        assert run_stage(tmp_path, calls=calls) == "42"
    assert len(calls) == 2
    assert (tmp_path / "stage" / "value.txt").read_text() == "42"
    assert run_stage(tmp_path, calls=calls) == "42" and len(calls) == 2


@pytest.mark.parametrize("text", ["{not json", '{"seconds": 1.0}', "[]"])
def test_corrupt_stage_json_is_recomputed(tmp_path, text):
    calls = []
    run_stage(tmp_path, calls=calls)
    (tmp_path / "stage" / "stage.json").write_text(text)
    with pytest.warns(UserWarning, match=r"stage: stage.json is unreadable.*recomputing"):
        run_stage(tmp_path, calls=calls)
    assert len(calls) == 2


def test_old_stage_json_without_files_is_still_skipped(tmp_path):
    calls = []
    run_stage(tmp_path, calls=calls)
    marker = tmp_path / "stage" / "stage.json"
    record = json.loads(marker.read_text())
    del record["files"]
    marker.write_text(json.dumps(record))
    (tmp_path / "stage" / "value.txt").write_text("43")  # not verifiable: trusted as before
    assert run_stage(tmp_path, calls=calls) == "43"
    assert calls == ["42"]


def test_artifact_that_fails_to_load_is_recomputed(tmp_path):
    calls = []
    run_stage(tmp_path, calls=calls)
    run = RunDir(tmp_path, fake_trainer())

    def load(folder):
        if len(calls) == 1:
            raise ValueError("header too large\nmore detail")
        return (folder / "value.txt").read_text()

    def compute(work):
        calls.append("again")
        return "7"

    with pytest.warns(UserWarning, match=r"stage: loading .* failed \(ValueError: header too "
                                         r"large\); recomputing"):
        assert run.stage("stage", {"a": 1}, compute,
                         lambda r, d: (d / "value.txt").write_text(r), load) == "7"


def test_second_lock_is_refused_naming_the_holder(tmp_path):
    first, second = RunDir(tmp_path / "run", fake_trainer()), RunDir(tmp_path / "run",
                                                                      fake_trainer())
    with first.lock():
        holder = json.loads((tmp_path / "run" / ".lock").read_text())
        assert holder["pid"] == os.getpid() and holder["host"] == socket.gethostname()
        with pytest.raises(SieveError, match=rf"in use by pid {os.getpid()} on host .* since "
                                             rf".*remove .*\.lock if that run is gone"):
            second.acquire()
    assert not (tmp_path / "run" / ".lock").exists()
    with second.lock():  # free again
        pass


def test_lock_is_released_on_errors_and_skipped_off_rank_zero(tmp_path):
    run = RunDir(tmp_path / "run", fake_trainer())
    with pytest.raises(RuntimeError):
        with run.lock():
            raise RuntimeError("stage failed")
    assert not (tmp_path / "run" / ".lock").exists()
    with run.lock():
        with RunDir(tmp_path / "run", fake_trainer(rank0=False)).lock():  # other DDP ranks
            pass
        assert (tmp_path / "run" / ".lock").exists()


def test_stale_lock_of_a_finished_process_is_replaced(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "started": "earlier"}))
    with pytest.warns(UserWarning, match=rf"stale lock of pid {gone.pid}"):
        with RunDir(tmp_path / "run", fake_trainer()).lock():
            assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()


def test_lock_of_another_host_is_refused(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(SieveError, match="in use by pid 1 on host elsewhere since earlier"):
        RunDir(tmp_path / "run", fake_trainer()).acquire()


def test_other_ranks_refuse_a_foreign_lock_with_rank_zeros_line(tmp_path, monkeypatch):
    """Under torchrun every rank checks: rank 0 alone refusing would leave the others to hang
    at their first collective."""
    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 0.2)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps(
        {"host": "elsewhere", "pid": 1, "started": "earlier", "job": "another job"}))
    with pytest.raises(SieveError) as zero:
        RunDir(tmp_path / "run", fake_trainer()).acquire()
    with pytest.raises(SieveError) as other:
        RunDir(tmp_path / "run", fake_trainer(rank0=False)).acquire()
    assert str(other.value) == str(zero.value)
    (tmp_path / "run" / ".lock").unlink()  # no lock at all (rank 0 done already): go on
    RunDir(tmp_path / "run", fake_trainer(rank0=False)).acquire()
    # Lightning's own launcher starts the other ranks from rank 0, after it took the lock
    (tmp_path / "run" / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": os.getppid(), "started": "now", "job": "its"}))
    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 30)
    start = time.monotonic()
    RunDir(tmp_path / "run", fake_trainer(rank0=False)).acquire()
    assert time.monotonic() - start < 1


def test_other_ranks_wait_while_rank_zero_replaces_a_stale_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(rundir, "LOCK_WAIT_S", 30)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / ".lock").write_text(json.dumps(
        {"host": socket.gethostname(), "pid": gone.pid, "started": "earlier", "job": "old"}))

    def rank_zero():
        time.sleep(0.5)
        with pytest.warns(UserWarning, match="stale lock"):
            RunDir(tmp_path / "run", fake_trainer()).acquire()

    thread = threading.Thread(target=rank_zero)
    thread.start()
    start = time.monotonic()
    RunDir(tmp_path / "run", fake_trainer(rank0=False)).acquire()
    thread.join()
    assert 0.4 < time.monotonic() - start < 30
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()


def test_unwritable_root_is_one_line(tmp_path):
    (tmp_path / "root").write_text("a file where the root folder should be")
    with pytest.raises(SieveError, match=r"cannot write to .*root: .*Not a directory"):
        RunDir(tmp_path / "root" / "run", fake_trainer()).acquire()
    (tmp_path / "run").write_text("a file where the run folder should be")
    with pytest.raises(SieveError, match=r"cannot write to "):
        RunDir(tmp_path / "run", fake_trainer()).acquire()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes to read-only folders")
def test_read_only_root_is_one_line(tmp_path):
    tmp_path.chmod(0o500)
    try:
        with pytest.raises(SieveError, match=r"cannot write to .*Permission denied"):
            RunDir(tmp_path / "run", fake_trainer()).acquire()
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.parametrize("name", ["../x", "/abs", "a/b", "a\\b", ".hidden", ".", "..", ""])
def test_run_name_must_be_one_plain_folder(name):
    with pytest.raises(SieveError, match="run.name"):
        RunConfig(name=name).check()


def test_plain_run_name_is_accepted():
    RunConfig(name="demo_1").check()


def test_content_id_follows_the_bytes(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    weights = model / "model.safetensors"
    weights.write_bytes(b"a" * 64)
    (model / "notes.md").write_text("not an input")
    before = content_id(model)
    assert set(before) == {"model.safetensors"} and before["model.safetensors"]["size"] == 64
    assert content_id(weights) == before["model.safetensors"]
    stat = weights.stat()
    weights.write_bytes(b"b" * 64)  # same size, other bytes
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    after = content_id(model)
    assert after["model.safetensors"]["size"] == 64
    assert after["model.safetensors"]["sha256"] != before["model.safetensors"]["sha256"]
    assert content_id("smollm2-135m-instruct") == {} == content_id("org/hub-model")
    assert content_id("") == {}


def test_fingerprints_and_json_convert_known_types_and_refuse_others(tmp_path):
    """``str`` of an arbitrary object (its address, a repr that changes between versions) in a
    fingerprint would re-run or wrongly skip stages: only known types are converted."""
    import numpy as np
    import torch

    assert fingerprint({"p": PurePosixPath("a/b")}) == fingerprint({"p": "a/b"})
    assert fingerprint((1, 2)) == fingerprint([1, 2])
    assert fingerprint(RunConfig(name="x")) == fingerprint(asdict(RunConfig(name="x")))
    assert fingerprint(np.int64(3), np.float32(0.5), torch.tensor(2)) == fingerprint(3, 0.5, 2)
    for bad, name in ((object(), "builtins.object"), ({1, 2}, "builtins.set"),
                      (torch.ones(2), "torch.Tensor"), (b"x", "builtins.bytes")):
        with pytest.raises(TypeError, match=f"cannot write a {name} as JSON"):
            fingerprint({"config": [bad]})
        with pytest.raises(TypeError, match=f"cannot write a {name} as JSON"):
            write_json(tmp_path / "out.json", {"x": bad})
    assert not list(tmp_path.iterdir())  # nothing half-written
    write_json(tmp_path / "out.json", {"path": PurePosixPath("a"), "n": np.int64(1)})
    assert json.loads((tmp_path / "out.json").read_text()) == {"path": "a", "n": 1}


def test_edited_model_recalibrates_but_another_model_is_refused(tmp_path):
    """check_run_dir compares names and paths; a content change is a recompute, not a refusal."""
    from sieve_pl.pipeline import Pipeline
    from sieve_pl.stages.calibrate import CalibrationConfig

    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "data.csv"
    data.write_text("text,label\na,b\n")
    pipeline = Pipeline.__new__(Pipeline)
    pipeline.run = RunConfig(name="demo", root=str(tmp_path / "runs"))
    pipeline.calibration = CalibrationConfig()
    pipeline.lm = SimpleNamespace(pretrained=str(model), dtype_name="float32")
    pipeline.data = SimpleNamespace(fingerprint_config=lambda split: {
        "source": str(data), "source_files": content_id(data)})
    config = pipeline._calibration_identity()
    assert config["model_files"] == content_id(model)
    marker = pipeline.run.path / "calibrate" / "stage.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"fingerprint": "x", "config": config, "seconds": 1.0}))
    (model / "config.json").write_text('{"edited": 1}')
    data.write_text("text,label\nc,d\n")
    assert pipeline._calibration_identity() != config  # recalibrates
    pipeline.check_run_dir()  # but is the same run
    pipeline.lm.pretrained = str(tmp_path / "other-model")
    with pytest.raises(SieveError, match="holds another run"):
        pipeline.check_run_dir()


def test_fit_holds_the_lock_and_releases_it(tmp_path, monkeypatch):
    from sieve_pl.pipeline import Pipeline

    pipeline = Pipeline.__new__(Pipeline)
    pipeline.run = RunConfig(name="demo", root=str(tmp_path))
    pipeline.trainer = fake_trainer()
    lock = tmp_path / "demo" / ".lock"

    def fit_body(self):
        assert lock.exists()
        raise RuntimeError("a stage failed")

    monkeypatch.setattr(Pipeline, "_fit", fit_body)
    with pytest.raises(RuntimeError, match="a stage failed"):
        pipeline.fit()
    assert not lock.exists()
    with RunDir(tmp_path / "demo", fake_trainer()).lock():
        with pytest.raises(SieveError, match="in use by pid"):
            pipeline.fit()


def test_disk_full_while_a_stage_computes_is_one_line(tmp_path):
    import errno

    def compute(work):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(SieveError, match=r"^the stage stage could not write .*No space left.*"
                                         r"rerun to resume$"):
        RunDir(tmp_path, fake_trainer()).stage("stage", {}, compute, None, None)
