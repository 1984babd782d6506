"""Task kinds, data sources and the DataModule."""
from .base import Task
from .classification import Classification
from .datamodule import SplitSizes, TaskDataModule

__all__ = ["Task", "Classification", "SplitSizes", "TaskDataModule"]
