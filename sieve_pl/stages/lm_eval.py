"""General-ability check: EleutherAI's lm-evaluation-harness on the base and pruned models.

Optional: needs ``pip install 'sieve-pl[lm-eval]'``; ``lm_eval`` is imported only when tasks are
set. The models are scored as they are loaded (already in memory, on whatever device they sit),
wrapped in lm-eval's ``HFLM``. Loglikelihood requests (multiple choice, perplexity) are padded by
lm-eval itself and generation requests re-pad the tokenizer on the left, so sieve-pl's
left-padding tokenizers need no change.
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import SieveError
from ..io import file_digest, read_json, write_json
from ..models.loading import load_model, load_tokenizer
from .stage import Context, Stage

INSTALL_HINT = "pip install 'sieve-pl[lm-eval]'"


@dataclass
class LmEvalConfig:
    """lm-evaluation-harness tasks scored on the base and the exported pruned model.

    Args:
        tasks: lm-eval task or group names (``[hellaswag, arc_easy]``, or tasks defined in
            ``include_path``); empty: no lm-eval scoring. Needs ``pip install
            'sieve-pl[lm-eval]'``; hub datasets need the network (or the HF datasets cache).
        limit: examples scored per task (the first ones of its split); None: all of them.
        num_fewshot: few-shot examples per prompt; None: each task's own default (0 when it
            sets none).
        batch_size: requests per forward pass.
        include_path: a folder of local task YAMLs, added to lm-eval's built-in tasks.
    """

    tasks: list[str] = field(default_factory=list)
    limit: int | None = None
    num_fewshot: int | None = None
    batch_size: int = 8
    include_path: str | None = None

    def __post_init__(self) -> None:
        self.check_values()  # a bad value fails where the config is built (parsing)

    def check_values(self) -> None:
        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise SieveError(f"lm_eval.include_path {self.include_path!r} is not a folder")
        if self.batch_size < 1 or (self.limit is not None and self.limit < 1) or (
                self.num_fewshot is not None and self.num_fewshot < 0):
            raise SieveError("lm_eval needs batch_size >= 1, limit >= 1 (or null) and "
                             "num_fewshot >= 0 (or null)")

    def check(self) -> None:
        """One-line errors before any weight is loaded: options, install, task names (lm-eval's
        task list takes seconds to build, so not at construction)."""
        self.check_values()
        if not self.tasks:
            return
        try:
            import lm_eval  # noqa: F401
        except ImportError:
            raise SieveError(f"lm_eval.tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None
        known = set(_task_manager(self.include_path).all_tasks)
        unknown = [task for task in self.tasks if task not in known]
        if unknown:
            where = f" or in {self.include_path}" if self.include_path else ""
            raise SieveError(f"lm_eval.tasks: unknown task(s) {', '.join(unknown)}: not an "
                             f"lm-eval task{where} (list them with `lm-eval ls tasks`)")

    def fingerprint(self) -> dict:
        """What the scores depend on, for the stage's fingerprint: the settings (not
        ``batch_size``: batching changes no score beyond float rounding), the lm-eval version
        (built-in task definitions change between releases) and the content of every file
        under ``include_path`` (an edited task YAML or data file is new input)."""
        config = {k: v for k, v in asdict(self).items() if k != "batch_size"}
        if not self.tasks:
            return config
        from importlib.metadata import version

        config["lm_eval_version"] = version("lm-eval")
        if self.include_path:
            root = Path(self.include_path)
            config["include_files"] = {str(f.relative_to(root)): file_digest(f)
                                       for f in sorted(root.rglob("*")) if f.is_file()}
        return config


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    """lm-eval's task index (built-in tasks plus ``include_path``): seconds to build, so one
    per folder and process."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(Path(include_path).resolve()) if include_path else None)


def _metrics(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}``: numbers only (``alias`` and "N/A" stderrs dropped); a metric
    under lm-eval's default filter keeps its plain name (``acc,none`` -> ``acc``)."""
    scores = {}
    for task, row in results.items():
        scores[task] = {}
        for key, value in row.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, _, filtered = key.partition(",")
            scores[task][metric if filtered in ("", "none") else key] = float(value)
    return scores


def score(model: torch.nn.Module, tokenizer, config: LmEvalConfig) -> dict[str, dict[str, float]]:
    """Score an already-loaded HF causal LM on ``config.tasks``: ``{task: {metric: value}}``
    (stderrs included as ``<metric>_stderr`` where lm-eval computed one, and lm-eval's
    ``sample_len``: the examples scored).

    ``backend="causal"``: sieve-pl's exported classes (``SieveLlamaForCausalLM``…) are not in
    transformers' causal-LM mapping, which lm-eval would otherwise warn about. The model is
    scored where it is (move it to the GPU first to score there), in eval mode; its mode, the
    tokenizer's padding side and the python, numpy and torch random states (lm-eval seeds all
    three for its few-shot sampling) are restored afterwards.
    """
    if not config.tasks:
        return {}
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SieveError(f"lm_eval.tasks needs lm-evaluation-harness: {INSTALL_HINT}") from None

    was_training = model.training
    padding_side = tokenizer.padding_side
    py_state, np_state = random.getstate(), np.random.get_state()
    device = getattr(model, "device", torch.device("cpu"))
    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            lm = HFLM(pretrained=model, tokenizer=tokenizer, backend="causal",
                      batch_size=config.batch_size)
            out = lm_eval.simple_evaluate(
                model=lm, tasks=list(config.tasks), limit=config.limit,
                num_fewshot=config.num_fewshot, task_manager=_task_manager(config.include_path),
                log_samples=False)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return _metrics(out["results"])


class LmEval(Stage):
    """Standard benchmarks for the base model and the export (rank 0 scores; the others read
    its scores when the stage loads)."""

    name = "lm_eval"
    needs = ("export",)  # the exported model only: the summary's settings change nothing

    def __init__(self, ctx: Context, pruner, final: str, config: LmEvalConfig):
        self.ctx, self.pruner, self.final, self.config = ctx, pruner, final, config

    def fingerprint(self) -> dict:
        return self.config.fingerprint()

    def run(self, work: Path) -> dict:
        ctx = self.ctx
        if not self.config.tasks or not ctx.trainer.is_global_zero:
            return {}
        device = ctx.trainer.strategy.root_device
        home = next(ctx.lm.net.parameters()).device
        with self.pruner.at(1.0):
            base = score(ctx.lm.place(device), ctx.data.tokenizer, self.config)
            if not ctx.lm.split:  # room for the export on the accelerator
                ctx.lm.net.to(home)
        folder = str(ctx.path / "export" / "model")
        exported, _ = load_model(folder, ctx.lm.dtype_name)
        return {"base": base,
                self.final: score(exported.to(device), load_tokenizer(folder), self.config)}

    def save(self, scores: dict, folder: Path) -> None:
        write_json(folder / "lm_eval.json", scores)

    def load(self, folder: Path) -> dict:
        return read_json(folder / "lm_eval.json")
