"""Hostile run folders and inputs: damaged work folders heal with a warning, bad input stops in
one line before heavy work, readers verify what they read and write nothing.

Most tests drive the run folder, the readers and the data checks directly; one tiny
distillation and one tiny fit run end to end (seconds each).
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from test_cli import QUIET
from test_distill import pruned  # noqa: F401  (a fixture: a tiny pruned model and its data)
from test_errors import DEMO, last_error_line, run_cli
from test_rundir import fake_trainer

from sieve_pl.cli import main
from sieve_pl.errors import SieveError
from sieve_pl.io import atomic, resume_checkpoint
from sieve_pl.rundir import RunDir
from sieve_pl.tasks.classification import Classification
from sieve_pl.tasks.generation import Generation
from sieve_pl.tasks.multiple_choice import MultipleChoice

PACKAGE = Path(__file__).parents[1] / "sieve_pl"
NO_SPACE = "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: " \
           "\"No space left on device\" })"  # what safetensors' save_file raises


def run_stage(path, calls: list):
    """One stage that writes ``value.txt``; ``calls`` gets the work folder of each computation."""
    def compute(work):
        calls.append(work)
        return "42"

    return RunDir(path, fake_trainer()).stage(
        "stage", {"a": 1}, compute, lambda r, d: (d / "value.txt").write_text(r),
        lambda d: (d / "value.txt").read_text())


# -- work folders that heal ------------------------------------------------------------------

def test_truncated_search_state_restarts_the_search_with_a_warning(tmp_path):
    from deap import tools

    from sieve_pl.stages.genetic import GeneticSearch

    (tmp_path / "state.json").write_text('{"generation": 3, "population": [[0, 1')
    search = object.__new__(GeneticSearch)  # _restore reads only the work folder before it fails
    search.work, search.cache, search.seen = tmp_path, {}, {}
    with pytest.warns(UserWarning, match=r"state.json is unreadable \(JSONDecodeError.*"
                                         r"starting the search from generation 0"):
        assert search._restore(tools.Logbook()) == (None, -1)
    (tmp_path / "state.json").write_text('{"generation": 3}')  # whole JSON, fields missing
    with pytest.warns(UserWarning, match=r"unreadable \(KeyError"):
        assert search._restore(tools.Logbook()) == (None, -1)
    assert search.cache == {} and search.seen == {}


@pytest.mark.parametrize("content", [b'{"format": 3, "fitn', b"\x00\xff", b"[]"])
def test_resumable_work_files_that_do_not_read_are_redone(tmp_path, content):
    """The search's ``uniform.json``, learned parts and the teacher's answers go through
    ``resumable``: unreadable, they are computed again with a warning."""
    from safetensors.torch import load_file

    from sieve_pl.io import read_json, resumable

    (tmp_path / "uniform.json").write_bytes(content)
    (tmp_path / "teacher.safetensors").write_bytes(content)
    if content != b"[]":
        with pytest.warns(UserWarning, match=r"uniform.json is unreadable .*; again"):
            assert resumable(tmp_path / "uniform.json", read_json, "again") is None
    with pytest.warns(UserWarning, match=r"teacher.safetensors is unreadable \(Safetensor"):
        assert resumable(tmp_path / "teacher.safetensors",
                         lambda p: load_file(str(p))["teacher"], "again") is None
    assert resumable(tmp_path / "absent.json", read_json, "again") is None


class _Planted:
    """An object whose unpickling touches a file: what a malicious ``last.ckpt`` would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def test_unreadable_or_planted_last_ckpt_is_set_aside(tmp_path, monkeypatch):
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 1, "loops": {"a": [1, 2.0]}}, good)
    assert resume_checkpoint(good) == str(good)
    assert resume_checkpoint(tmp_path / "absent.ckpt") is None

    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:40])
    with pytest.warns(UserWarning, match=r"truncated.ckpt is unreadable .*training from the start"):
        assert resume_checkpoint(truncated) is None

    marker = tmp_path / "ran"
    planted = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "x": _Planted(marker)}, planted)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match=r"last.ckpt is unreadable"):
        assert resume_checkpoint(planted) is None
    assert not marker.exists()
    torch.load(planted, weights_only=False)  # (the plant is live: an unchecked load runs it)
    assert marker.exists()

    (tmp_path / "folder.ckpt").mkdir()
    with pytest.warns(UserWarning, match="unreadable"):
        assert resume_checkpoint(tmp_path / "folder.ckpt") is None


def test_distillation_with_a_planted_last_ckpt_trains_from_the_start(pruned, tmp_path,
                                                                       monkeypatch):
    """Through a real training stage: the planted checkpoint is set aside (nothing runs) and
    the result is that of a run that never had one."""
    from test_distill import _distill

    full = _distill(pruned, tmp_path / "a")
    marker = tmp_path / "ran"
    (tmp_path / "b").mkdir()
    torch.save({"state_dict": {}, "x": _Planted(marker)}, tmp_path / "b" / "last.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.warns(UserWarning, match=r"last.ckpt is unreadable .*training from the start"):
        healed = _distill(pruned, tmp_path / "b")
    assert not marker.exists()
    assert healed["val_kl"] == pytest.approx(full["val_kl"], rel=0, abs=0)


def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr == name):
            yield node


def test_every_checkpoint_load_is_weights_only():
    """``torch.load`` and ``trainer.fit(ckpt_path=...)`` name ``weights_only=True`` everywhere,
    and every resumed ``last.ckpt`` goes through :func:`resume_checkpoint` first."""
    for source in PACKAGE.rglob("*.py"):
        tree = ast.parse(source.read_text())
        for call in [*_calls(tree, "load"), *_calls(tree, "fit")]:
            keywords = {k.arg: k.value for k in call.keywords}
            is_torch_load = (call.func.attr == "load" and isinstance(call.func.value, ast.Name)
                             and call.func.value.id == "torch")
            if not is_torch_load and "ckpt_path" not in keywords:
                continue
            where = f"{source.name}:{call.lineno}"
            assert isinstance(keywords.get("weights_only"), ast.Constant), where
            assert keywords["weights_only"].value is True, where
            if "ckpt_path" in keywords:
                assert ast.unparse(keywords["ckpt_path"]).startswith("resume_checkpoint("), where


def test_stage_folder_that_is_a_link_or_a_file_is_recomputed_and_replaced(tmp_path):
    calls = []
    run = tmp_path / "run"
    assert run_stage(run, calls) == "42"
    elsewhere = tmp_path / "elsewhere"
    (run / "stage").rename(elsewhere)
    (run / "stage").symlink_to(elsewhere, target_is_directory=True)
    with pytest.warns(UserWarning, match=r"stage: .*stage is not a folder \(a link or a file\); "
                                         r"recomputing"):
        assert run_stage(run, calls) == "42"
    assert len(calls) == 2 and not (run / "stage").is_symlink() and (run / "stage").is_dir()
    assert (elsewhere / "value.txt").read_text() == "42"  # what the link pointed to is kept

    (run / "other").mkdir()
    os.replace(run / "stage", run / "other" / "stage")
    (run / "stage").write_text("not a folder")
    with pytest.warns(UserWarning, match="not a folder"):
        assert run_stage(run, calls) == "42"
    assert len(calls) == 3 and (run / "stage" / "stage.json").exists()


@pytest.mark.parametrize("kind", ["file", "link", "bad fingerprint"])
def test_work_folder_that_is_not_a_folder_starts_the_stage_from_scratch(tmp_path, kind):
    run, target = tmp_path / "run", tmp_path / "target"
    target.mkdir()
    (target / "keep.txt").write_text("not sieve-pl's")
    run.mkdir()
    work = run / ".stage.work"
    if kind == "file":
        work.write_text("junk")
    elif kind == "link":
        work.symlink_to(target, target_is_directory=True)
    else:
        work.mkdir()
        (work / "fingerprint").mkdir()
    calls = []
    with pytest.warns(UserWarning, match=r"stage: .*(is not a folder|is unreadable).*scratch"):
        assert run_stage(run, calls) == "42"
    assert len(calls) == 1 and calls[0] == work
    assert not work.exists() and not work.is_symlink()  # removed once the stage completed
    assert (target / "keep.txt").read_text() == "not sieve-pl's"


@pytest.mark.parametrize("kind", ["folder", "link"])
def test_lock_that_is_not_a_file_is_replaced(tmp_path, kind):
    run = tmp_path / "run"
    run.mkdir()
    if kind == "folder":
        (run / ".lock").mkdir()
        (run / ".lock" / "inside").write_text("x")
    else:
        (run / ".lock").symlink_to(tmp_path / "nowhere")
    with pytest.warns(UserWarning, match=r"\.lock is not a lock file \(a folder or a link\)"):
        with RunDir(run, fake_trainer()).lock():
            assert json.loads((run / ".lock").read_text())["pid"] == os.getpid()
    assert not (run / ".lock").exists()


# -- one-line errors before heavy work ---------------------------------------------------------

@pytest.mark.parametrize("option,value,message", [
    ("--search.tournament_size", "0", "search.tournament_size must be >= 1, got 0"),
    ("--search.crossover_prob", "1.5", "search.crossover_prob must be in [0, 1], got 1.5"),
    ("--search.mutation_prob", "-0.1", "search.mutation_prob must be in [0, 1]"),
    ("--search.gene_mutation_prob", "2", "search.gene_mutation_prob must be in [0, 1]"),
])
def test_search_options_are_range_checked_when_parsed(tmp_path, capsys, option, value, message):
    assert run_cli("fit", "--config", DEMO, "--run.root", str(tmp_path), option, value) == 2
    line = last_error_line(capsys)
    assert line.startswith("sieve-pl: error: ") and message in line
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("task,prompt,message", [
    (Classification, "Review: {text} {oops}",
     r"unknown placeholder\(s\) \{oops\}; it can use \{text\}"),
    (Classification, "Review: {text} {", r"not a valid template"),
    (Generation, "Q: {question} {answer}", r"unknown placeholder\(s\) \{answer\}"),
    (MultipleChoice, "{question}\n{options}{choices}", r"\{choices\}"),
])
def test_prompt_with_an_unknown_placeholder_is_one_line(task, prompt, message):
    with pytest.raises(SieveError, match=message):
        task(prompt=prompt)


def _data(tmp_path, rows: list[dict], sizes=(4, 4, 4), name="data.jsonl"):
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    path = tmp_path / name
    if name.endswith(".parquet"):
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return TaskDataModule(source=str(path), sizes=SplitSizes(*sizes), batch_size=4)


def _rows(n=12):
    return [{"text": f"review number {i}", "label": ("fresh", "rotten")[i % 2]} for i in range(n)]


def test_null_text_is_refused_not_prompted_as_none(tmp_path, tokenizer):
    rows = _rows()
    rows[5]["text"] = None
    with pytest.raises(SieveError, match=r"data: row \d+ of the \w+ split has no 'text' \(null\)"):
        _data(tmp_path, rows).prepare(tokenizer)


def test_list_typed_label_column_of_a_parquet_is_one_line(tmp_path, tokenizer):
    rows = [{"text": [r["text"], "more"], "label": [r["label"]]} for r in _rows()]
    with pytest.raises(SieveError, match=r"label column 'label' holds list values"):
        _data(tmp_path, rows, name="data.parquet").prepare(tokenizer)
    for row in rows:  # a list of passages as the text stays allowed (joined by newlines)
        row["label"] = row["label"][0]
    _data(tmp_path, rows, name="ok.parquet").prepare(tokenizer)


@pytest.fixture(scope="module")
def damaged_models(make_tiny_llama, tmp_path_factory):
    """Copies of a tiny model: without weights, truncated weights, an unknown sieve type."""
    import shutil

    source = Path(make_tiny_llama("hostile_model"))
    root = tmp_path_factory.mktemp("damaged")
    made = {}
    for case in ("no weights", "truncated", "unknown type"):
        folder = root / case.replace(" ", "_")
        shutil.copytree(source, folder)
        weights = folder / "model.safetensors"
        if case == "no weights":
            weights.unlink()
        elif case == "truncated":
            weights.write_bytes(weights.read_bytes()[:1000])
        else:
            config = json.loads((folder / "config.json").read_text())
            (folder / "config.json").write_text(json.dumps({**config,
                                                            "model_type": "sieve_bogus"}))
        made[case] = str(folder)
    return made


@pytest.mark.parametrize("case,message", [
    ("no weights", r"cannot load the weights of model .*OSError: .*no file named"),
    ("truncated", r"cannot load the weights of model .*SafetensorError"),
    ("unknown type", r"model_type 'sieve_bogus' is no architecture this transformers knows"),
])
def test_damaged_model_folder_is_one_line(damaged_models, case, message):
    from sieve_pl.models.loading import load_model

    with pytest.raises(SieveError, match=message) as error:
        load_model(damaged_models[case])
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), "safetensors"])
def test_full_disk_in_a_stage_writer_keeps_no_tmp(tmp_path, failure):
    from safetensors import SafetensorError

    error = SafetensorError(NO_SPACE) if failure == "safetensors" else failure

    def save(result, folder):
        (folder / "model.safetensors").write_bytes(b"x" * 100)
        raise error

    run = RunDir(tmp_path / "run", fake_trainer())
    with pytest.raises(SieveError, match=r"writing the export stage .*No space left on device"
                                         r".*nothing partial was kept"):
        run.stage("export", {}, lambda work: 1, save, lambda d: None)
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".export.work"]

    def compute(work):
        raise error

    with pytest.raises(SieveError, match=r"the export stage could not write"):
        RunDir(tmp_path / "run", fake_trainer()).stage("export", {}, compute, save, None)


def test_atomic_writes_leave_no_tmp_when_the_disk_is_full(tmp_path):
    for make in (lambda t: t.write_bytes(b"x"), lambda t: (t.mkdir(), (t / "f").write_text("x"))):
        with pytest.raises(OSError, match="No space"):
            with atomic(tmp_path / "out") as tmp:
                make(tmp)
                raise OSError(28, "No space left on device")
        assert list(tmp_path.iterdir()) == []


def test_full_disk_outside_a_stage_is_one_line(monkeypatch, capsys):
    from safetensors import SafetensorError

    from sieve_pl import cli

    monkeypatch.setattr(cli, "SieveCLI", lambda *args, **kwargs: None)
    monkeypatch.setattr(cli, "measure_one", lambda _: (_ for _ in ()).throw(
        SafetensorError(NO_SPACE)))
    assert run_cli("measure") == 2
    assert last_error_line(capsys) == ("sieve-pl: error: a write failed (SafetensorError: "
                                       f"{NO_SPACE}); free space or fix permissions and rerun")
    monkeypatch.setattr(cli, "measure_one", lambda _: (_ for _ in ()).throw(
        OSError(5, "Input/output error")))
    with pytest.raises(OSError, match="Input/output"):  # not a write the user can fix: raised
        main(["measure"])


# -- data warnings before calibration ----------------------------------------------------------

def test_data_warnings_before_calibration(tmp_path, tokenizer):
    rows = _rows()
    rows[1]["text"] = "   "
    with pytest.warns(UserWarning, match=r"data: 1 examples have an empty prompt text"):
        _data(tmp_path, rows, name="empty.jsonl").prepare(tokenizer)

    rows = _rows()
    for row in rows[6:]:
        row["text"] = rows[0]["text"]
    with pytest.warns(UserWarning, match=r"same prompt text is in more than one split \("):
        _data(tmp_path, rows, name="dupes.jsonl").prepare(tokenizer)

    rows = [{**r, "label": "fresh"} for r in _rows()]
    with pytest.warns(UserWarning, match=r"one class only in validation \('fresh'\), test "
                                         r"\('fresh'\)"):
        _data(tmp_path, rows, name="one.jsonl").prepare(tokenizer)


def test_clean_data_gives_no_data_warning(tmp_path, tokenizer, recwarn):
    _data(tmp_path, _rows()).prepare(tokenizer)
    assert not [w for w in recwarn if "[sieve-pl] data" in str(w.message)]


# -- readers verify and write nothing ----------------------------------------------------------

@pytest.fixture(scope="module")
def exported_run(tiny_llama, tmp_path_factory):
    """A run folder holding only a sealed export (the tiny model copied in by RunDir)."""
    import shutil

    root = tmp_path_factory.mktemp("runs")
    RunDir(root / "demo", fake_trainer()).stage(
        "export", {}, lambda work: None,
        lambda _, folder: shutil.copytree(tiny_llama, folder / "model"), lambda folder: None)
    return root


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*"))}


def _reader(tiny_llama, root, command="test", *extra):
    return run_cli(command, "--model.pretrained", tiny_llama, "--run.root", str(root),
                   "--data.sizes", "{calibration: 0, validation: 4, test: 4, train: 0}",
                   "--data.batch_size", "4", *QUIET, *extra)


def test_readers_score_a_verified_export_and_write_nothing_into_the_run(exported_run,
                                                                          tiny_llama, capsys):
    before = _snapshot(exported_run)
    assert _reader(tiny_llama, exported_run, "test", "--evaluate", "pruned") == 0
    assert "pruned: test" in capsys.readouterr().out
    assert _reader(tiny_llama, exported_run, "validate") == 0  # auto: base and pruned
    assert _snapshot(exported_run) == before  # no lightning_logs, nothing else


@pytest.mark.parametrize("command", ["test", "validate", "measure"])
def test_readers_refuse_an_export_that_is_not_what_was_written(exported_run, tiny_llama,
                                                                capsys, tmp_path, command):
    weights = exported_run / "demo" / "export" / "model" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))  # same size, one bit off
    extra = ["--evaluate", "pruned"] + (["--out", str(tmp_path / "m.json")]
                                        if command == "measure" else [])
    try:
        assert _reader(tiny_llama, exported_run, command, *extra) == 2
    finally:
        weights.write_bytes(original)
    line = last_error_line(capsys)
    assert line.startswith("sieve-pl: error: ") and line.endswith(
        "export: model/model.safetensors does not match what was written (checksum); "
        "rerun `sieve-pl fit` to rebuild it")
    assert not (tmp_path / "m.json").exists()


# -- the measuring subprocess ends with fit ----------------------------------------------------

def test_measuring_child_is_started_to_die_with_fit(tmp_path, monkeypatch):
    from sieve_pl.stages import evaluate
    from sieve_pl.stages.evaluate import QuantizeConfig, measure_forms

    seen = []

    def run(command, env, **kwargs):
        seen.append(env)
        Path(command[command.index("--out") + 1]).write_text(json.dumps(
            {k: 1.0 for k in evaluate.MEASURES}))
        return SimpleNamespace(returncode=0, stderr="")

    monkeypatch.setattr(evaluate.subprocess, "run", run)
    rows = {"base": {}, "pruned": {"target_params_kept": 1, "params": 1}}
    measure_forms(rows, "pruned", tmp_path, tmp_path, QuantizeConfig())
    assert [env["SIEVE_PL_PARENT_PID"] for env in seen] == [str(os.getpid())] * 2


def test_child_with_die_with_parent_ends_when_its_parent_is_killed(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    child = ("import os, time; from sieve_pl.io import die_with_parent; die_with_parent(); "
             "assert 'SIEVE_PL_PARENT_PID' not in os.environ; print('armed', flush=True); "
             "time.sleep(60)")
    parent = ("import os, subprocess, sys, time; "
              "env = dict(os.environ, SIEVE_PL_PARENT_PID=str(os.getpid())); "
              f"p = subprocess.Popen([sys.executable, '-c', {child!r}], env=env); "
              "print(p.pid, flush=True); time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=str(PACKAGE.parent))
    started = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, env=env,
                               text=True)
    pid = int(started.stdout.readline())
    assert started.stdout.readline().strip() == "armed"  # (the child writes to the same pipe)
    os.kill(pid, 0)  # alive while its parent is
    started.kill()
    started.wait()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
            if " Z " in Path(f"/proc/{pid}/stat").read_text():  # dead, not yet reaped
                break
        except (ProcessLookupError, FileNotFoundError):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, signal.SIGKILL)
        pytest.fail("the child outlived its parent")


def test_fit_heals_a_hostile_run_folder_end_to_end(tmp_path, tiny_llama):
    """One tiny fit through the CLI over a folder a crash and a hand have damaged."""
    run = tmp_path / "demo"
    run.mkdir()
    (run / ".lock").mkdir()
    (run / ".search.work").write_text("not a folder")
    (run / ".calibrate.work").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (run / "project").symlink_to(tmp_path, target_is_directory=True)
    with pytest.warns(UserWarning) as record:
        assert run_cli("fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
                       "--data.sizes", "{calibration: 12, validation: 10, test: 10, train: 0}",
                       "--data.batch_size", "5", "--search.strategy", "uniform", *QUIET) == 0
    said = "\n".join(str(w.message) for w in record)
    assert ".lock is not a lock file" in said
    assert "search: " in said and ".search.work is not a folder" in said
    assert ".calibrate.work is not a folder" in said and "project is not a folder" in said
    assert (run / "export" / "stage.json").exists() and not (run / "project").is_symlink()
    assert not (run / ".lock").exists() and not (tmp_path / "elsewhere").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo"]  # the link's target kept
