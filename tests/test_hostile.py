"""Hostile run folders and inputs: damaged work folders heal with a warning, bad input stops in
one line before heavy work, readers verify what they read and write nothing.

Most tests drive the run folder and the readers directly (seconds); no model is trained.
"""
from __future__ import annotations

import ast
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sieve_pl.io import resume_checkpoint
from sieve_pl.rundir import RunDir

PACKAGE = Path(__file__).parents[1] / "sieve_pl"


def fake_trainer():
    return SimpleNamespace(is_global_zero=True, strategy=SimpleNamespace(barrier=lambda: None))


def run_stage(path, calls: list, compute=None):
    """One stage that writes ``value.txt``; ``calls`` counts its computations."""
    def default(work):
        calls.append(work)
        return "42"

    return RunDir(path, fake_trainer()).stage(
        "stage", {"a": 1}, compute or default, lambda r, d: (d / "value.txt").write_text(r),
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
