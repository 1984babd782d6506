"""Named progress bars: Lightning's prediction bar says only "Predicting", and sieve-pl runs
prediction loops for many purposes (calibration, evaluation of each model on each split, refit).

The CLI installs :class:`StageBar` as the trainer's progress bar; :func:`named` gives the loops
inside it a name. With any other bar (or none) ``named`` changes nothing.
"""
from __future__ import annotations

from contextlib import contextmanager

from lightning.pytorch.callbacks import TQDMProgressBar


class StageBar(TQDMProgressBar):
    """Lightning's tqdm bar whose prediction loops carry the stage's name."""

    stage = "Predicting"

    @property
    def predict_description(self) -> str:
        return self.stage


@contextmanager
def named(trainer, name: str):
    """Prediction loops inside the block show ``name`` on the trainer's StageBar."""
    bar = getattr(trainer, "progress_bar_callback", None)
    if not isinstance(bar, StageBar):
        yield
        return
    before, bar.stage = bar.stage, name
    try:
        yield
    finally:
        bar.stage = before
