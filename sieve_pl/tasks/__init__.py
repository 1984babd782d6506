"""Task kinds, data sources and the DataModule."""
from .base import Task
from .classification import Classification
from .datamodule import SplitSizes, TaskDataModule
from .generation import Generation
from .multiple_choice import MultipleChoice

__all__ = ["Task", "Classification", "MultipleChoice", "Generation", "SplitSizes",
           "TaskDataModule"]
