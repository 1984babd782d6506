"""Named progress bars: Lightning's prediction bar says only "Predicting", and sieve-pl runs
prediction loops for many purposes (calibration, evaluation of each model on each split, refit).

The CLI installs :class:`StageBar` as the trainer's progress bar; :func:`named` gives the loops
inside it a name. With any other bar (or none) ``named`` changes nothing. sieve-pl's own loops
(search candidates, projection, refit) draw tqdm bars unless :func:`quiet` says not to.
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


def quiet(trainer) -> bool:
    """No bar of our own: not rank 0, or the user turned bars off (``--trainer.enable_progress_bar
    false``, which leaves the trainer without a progress bar callback)."""
    if not trainer.is_global_zero:
        return True
    return hasattr(trainer, "progress_bar_callback") and trainer.progress_bar_callback is None
