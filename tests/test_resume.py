"""SIGKILL part-way through every stage, rerun the same command: the same artifacts as a run that
was never interrupted, and no half-written stage is ever taken for a finished one.

The kills come from ``SIEVE_PL_CRASH_AT`` (``sieve_pl.io.crash_point``): the process dies with
SIGKILL at a named point — mid-loop for calibration, search and recovery, between writing a
stage's files and marking it complete for projection and export.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from sieve_pl.io import SafetensorsFolder, read_json

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")
STAGES = ["calibrate", "project", "search", "refit", "distill", "recover", "export", "evaluate"]
ARTIFACTS = ["calibrate", "project",
             "recover/weights.safetensors", "export/model/model.safetensors"]


def fit(tiny_llama: str, root: Path, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.pop("SIEVE_PL_CRASH_AT", None)
    if crash_at:
        env["SIEVE_PL_CRASH_AT"] = crash_at
    command = [sys.executable, "-m", "sieve_pl.cli", "fit", "--config", DEMO,
               "--model.pretrained", tiny_llama, "--run.root", str(root), "--run.name", "tiny",
               "--data.sizes", "{calibration: 12, validation: 10, test: 6, train: 12}",
               "--data.batch_size", "4", "--search.strategy", "genetic",
               "--search.population", "4",
               "--search.generations", "3", "--search.rank_multiple", "1",
               "--recover.epochs", "2", "--recover.patience", "5",
               "--recover.compare_dense", "false", "--quantize.formats", "[]",
               "--quantize.measure", "false", "--trainer.enable_progress_bar", "false",
               "--trainer.enable_model_summary", "false"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)


def tensors(path: Path) -> dict:
    """A safetensors file, or every shard of a folder."""
    return dict(SafetensorsFolder(path)) if path.is_dir() else load_file(str(path))


def finished_stages(run: Path) -> list[str]:
    """Visible stage folders; each must be complete (stage.json written last)."""
    done = [s for s in STAGES if (run / s).exists()]
    for stage in done:
        assert (run / stage / "stage.json").exists(), f"{stage}/ visible but not complete"
    return done


@pytest.fixture(scope="module")
def reference(tiny_llama, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("uninterrupted")
    done = fit(tiny_llama, root)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "tiny"


def test_killed_in_every_stage_then_rerun_equals_uninterrupted(reference, tiny_llama, tmp_path):
    run = tmp_path / "tiny"
    # each kill lands in a later stage than the one before: a rerun resumes, then dies again
    # (project:layer#1 dies after the first layer's bases file: the rerun projects the rest)
    for crash_at, stage in [("calibrate:layer#1", "calibrate"), ("project:layer#1", "project"),
                            ("project:saved", "project"),
                            ("search:generation#2", "search"), ("recover:step#4", "recover"),
                            ("export:saved", "export")]:
        done = fit(tiny_llama, tmp_path, crash_at)
        assert done.returncode == -signal.SIGKILL, (crash_at, done.stderr[-3000:])
        finished = finished_stages(run)
        assert stage not in finished, f"{stage} looks finished after a kill inside it"
        assert finished == STAGES[:STAGES.index(stage)], (crash_at, finished)
    # the search and the recovery left their checkpoints behind; the rerun continues from them
    assert (run / ".search.work").exists() is False  # search finished on an earlier rerun

    done = fit(tiny_llama, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert finished_stages(run) == STAGES
    for path in ARTIFACTS:
        ours, theirs = tensors(run / path), tensors(reference / path)
        assert ours.keys() == theirs.keys(), path
        for key in ours:
            assert ours[key].equal(theirs[key]), f"{path}: {key} differs"
    assert read_json(run / "search" / "levels.json") == read_json(reference / "search" /
                                                                   "levels.json")
    assert (read_json(run / "summary.json")["rows"]
            == read_json(reference / "summary.json")["rows"])
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.work"))
