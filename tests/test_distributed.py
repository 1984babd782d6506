"""DDP with 2 CPU processes (gloo) decides exactly what one process decides."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from sieve_pl.io import SafetensorsFolder, read_json

SIEVE_PL = str(Path(sys.executable).parent / "sieve-pl")


def _fit(model: str, root: Path, *extra: str) -> Path:
    args = [SIEVE_PL, "fit", "--model.pretrained", model, "--run.root", str(root),
            "--data.sizes.calibration", "12", "--data.sizes.validation", "30",
            "--data.sizes.test", "10", "--data.batch_size", "4", "--search.population", "6",
            "--search.generations", "3", "--trainer.accelerator", "cpu",
            "--trainer.enable_progress_bar", "false", *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "demo"


def test_two_processes_equal_one(tiny_llama, tmp_path):
    one = _fit(tiny_llama, tmp_path / "one", "--trainer.devices", "1")
    two = _fit(tiny_llama, tmp_path / "two", "--trainer.devices", "2",
               "--trainer.strategy", "ddp")
    s1 = dict(SafetensorsFolder(one / "calibrate"))
    s2 = dict(SafetensorsFolder(two / "calibrate"))
    assert s1.keys() == s2.keys()
    for key in s1:
        if key.endswith(".count"):
            assert int(s1[key]) == int(s2[key])
        else:
            # batches differ in composition (and so in padding) across ranks: fp32 forward noise
            assert float((s2[key] - s1[key]).norm() / s1[key].norm()) < 1e-6, key
    # the same units (neuron orders and refits of every MLP, factors of every matrix), though
    # each rank projected a share of the layers (one file each)
    b1 = dict(SafetensorsFolder(one / "project"))
    b2 = dict(SafetensorsFolder(two / "project"))
    assert b1.keys() == b2.keys() and any(k.endswith(".mlp.order") for k in b1)
    for key in b1:  # (float32 decompositions of statistics equal to ~1e-7)
        torch.testing.assert_close(b2[key], b1[key], rtol=1e-3, atol=1e-4)
    r1, r2 = read_json(one / "search" / "search.json"), read_json(two / "search" / "search.json")
    for key in ("levels", "genome", "value", "accuracy", "logbook", "uniform"):
        assert r1[key] == r2[key], key
    w1 = load_file(str(one / "export" / "model" / "model.safetensors"))
    w2 = load_file(str(two / "export" / "model" / "model.safetensors"))
    assert w1.keys() == w2.keys()
    for key in w1:  # (float32 bases of statistics equal to ~1e-7)
        torch.testing.assert_close(w2[key], w1[key], rtol=1e-4, atol=1e-5)
    assert read_json(one / "summary.json")["rows"] == read_json(two / "summary.json")["rows"]


def test_recovery_trains_under_ddp_and_rank_zero_writes_once(tiny_llama, tmp_path):
    run = _fit(tiny_llama, tmp_path, "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--recover.enabled", "true", "--data.sizes.train", "16", "--recover.epochs", "2",
               "--recover.steps", "0", "--recover.compare_dense", "false",
               "--recover.lr", "0.005")
    recovered = read_json(run / "recover" / "recover.json")
    assert len(recovered["val_acc"]) == 2 and len(recovered["train_loss"]) == 2
    assert len(recovered["train_distill"]) == 2  # the default objective: the pool's KL too
    weights = load_file(str(run / "recover" / "weights.safetensors"))
    assert weights and all(torch.isfinite(w).all() for w in weights.values())
    rows = read_json(run / "summary.json")["rows"]
    assert "pruned+lora" in rows and rows["pruned+lora"]["validation"] == max(
        recovered["val_acc"])
    # one CSV log (rank 0's), no stray temporary or work folders
    assert len(list((run / "recover").glob("*.safetensors"))) == 1
    assert not list(run.glob(".*.tmp")) and not list(run.glob(".*.work"))
