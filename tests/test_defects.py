"""Defects fixed with a test each: measured disk sizes wherever the files are, SIGTERM."""
from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from sieve_pl.models.module import SieveLM, disk_bytes


def _lm(name: str) -> SieveLM:
    lm = SieveLM(name)
    lm.net = torch.nn.Linear(4, 3)  # only read when no weight file is on disk
    return lm


def test_disk_size_of_a_local_folder_a_cached_hub_id_and_a_model_not_on_disk(
        tiny_llama, tmp_path, monkeypatch):
    weights = Path(tiny_llama) / "model.safetensors"
    size = weights.stat().st_size
    assert disk_bytes(_lm(tiny_llama)) == size
    # the hub cache's layout: refs/main names a snapshot whose files link to blobs
    repo = tmp_path / "hub" / "models--org--tiny"
    snapshot = repo / "snapshots" / "0123abc"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    for name in ("model.safetensors", "config.json"):
        shutil.copy(Path(tiny_llama) / name, repo / "blobs" / name)
        (snapshot / name).symlink_to(repo / "blobs" / name)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert disk_bytes(_lm("org/tiny")) == size
    # not on this disk: the weights in memory, not 0
    assert disk_bytes(_lm("org/absent")) == (4 * 3 + 3) * 4


def test_measure_reports_the_local_weights_on_disk(tiny_llama, trainer, tiny_data):
    from sieve_pl.models.module import measure

    measured = measure(trainer, SieveLM(tiny_llama), tiny_data)
    size = (Path(tiny_llama) / "model.safetensors").stat().st_size
    assert measured["disk_mb"] == size / 2**20 > 0


def test_sigterm_stops_a_prediction_loop(tiny_llama, tiny_data):
    """Lightning alone only flags SIGTERM for fit loops; a run in calibration or evaluation
    must stop too (the rerun resumes)."""
    import os
    import signal

    import lightning as L
    from lightning.pytorch.callbacks import Callback

    from sieve_pl.cli import stop_on_sigterm
    from sieve_pl.models.module import SieveLM, evaluate

    class Term(Callback):
        def on_predict_batch_start(self, trainer, *args):
            os.kill(os.getpid(), signal.SIGTERM)

    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(tiny_data.task)
    before = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[Term()],
                            enable_progress_bar=False, enable_model_summary=False)
        with pytest.raises(SystemExit) as stopped:
            evaluate(trainer, lm, tiny_data.val_dataloader())
        assert stopped.value.code == 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGTERM, before)
