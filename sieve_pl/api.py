"""The public surface: what bench/ scripts and users' own scripts import from sieve_pl.

Everything else is internal and may move; these names stay. Grouped as the pipeline runs:

- running it: :func:`main` (the ``sieve-pl`` command), :class:`SieveCLI` (the parsed command
  line, ``SieveCLI(args, run=False).pipeline()`` opens a run without running it), :class:`RunDir`
  (the run folder: each stage skipped, loaded or computed);
- models: :func:`load_model`, :func:`load_tokenizer`, :func:`left_padded`, the built-in
  offline models, :func:`evaluate` and :func:`outputs` (one pass over a loader),
  :func:`last_logits`, :func:`dense_weight`;
- stages as functions: :func:`calibrate`, :func:`project` (:data:`METHODS`,
  :func:`neuron_basis`), :func:`search` (a :class:`SearchResult`) with :class:`Fitness` (a
  :class:`Verdict` per candidate), :func:`recover` (:func:`lora_targets`,
  :func:`recovery_loader`), :func:`write_gguf`; the :class:`Pruner` that cuts a model to any
  levels, :func:`layer_and_kind`, and the stages' typed results (:class:`Compensated`);
- data: :func:`load_source` (a built-in set, local file or hub id as rows);
- files and measuring: :func:`read_json`, :class:`PeakMemory`.
"""
from __future__ import annotations

from .cli import SieveCLI, main
from .io import PeakMemory, read_json
from .models.factored import dense_weight
from .models.forward import last_logits
from .models.loading import (BUILTIN_MODELS, DEFAULT_MODEL, builtin_gguf, left_padded,
                             load_model, load_tokenizer)
from .models.module import evaluate, outputs
from .models.pruning import Pruner, layer_and_kind
from .models.to_gguf import write_gguf
from .rundir import RunDir
from .stages.calibrate import calibrate
from .stages.project import project
from .stages.recover import lora_targets, recover, recovery_loader
from .stages.fitness import Verdict
from .stages.search import Fitness, SearchResult, search
from .stages.stage import Compensated
from .tasks.sources import load_source
from .units import METHODS, neuron_basis

__all__ = ["BUILTIN_MODELS", "Compensated", "DEFAULT_MODEL", "Fitness", "METHODS", "PeakMemory",
           "Pruner", "RunDir", "SieveCLI", "builtin_gguf", "calibrate", "dense_weight",
           "evaluate", "last_logits", "layer_and_kind", "left_padded", "load_model",
           "load_source", "load_tokenizer", "lora_targets", "main", "neuron_basis", "outputs",
           "project", "read_json", "recover", "recovery_loader", "search", "SearchResult", "Verdict",
           "write_gguf"]
