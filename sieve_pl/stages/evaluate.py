"""Evaluate stage: every variant on the test split and the transfer datasets, then disk, memory
and latency of the deployable forms. Kept apart from ``pipeline.py`` so that it reads as the
stage order; the configs of what is scored and where the export goes live here too.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import lightning as L

from ..errors import SieveError
from ..io import PARENT_ENV, read_json, write_json
from ..models.hf import save_pruned, save_standard
from ..models.loading import BUILTIN_MODELS, builtin_gguf
from ..models.to_decilm import save_decilm
from ..models.to_gguf import check as gguf_check, write_gguf
from ..models.module import SieveLM, evaluate
from ..models.pruning import Pruner
from ..tasks.datamodule import TaskDataModule
from .search_config import SearchConfig
from .stage import Compensated, Confirmed, Context, Recovered, Searched, Stage


DISTRIBUTED_ENV = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                   "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID",
                   "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID"}


MEASURES = ("latency_ms_per_example", "peak_memory_mb", "weights_mb", "disk_mb")


@dataclass
class QuantizeConfig:
    """Quantized forms of the exported model (bitsandbytes, applied when it is loaded).

    Args:
        formats: forms to evaluate: int8 and/or nf4.
        measure: also measure disk size, peak memory and latency of the base and exported
            models (each in a fresh process, on the test split).
        examples: test examples each measured form scores (latency, peak memory, and the
            quantized forms' accuracy, then marked with the count); 0 = the whole test split
            and the validation split too. bitsandbytes' CPU kernels are slow: on a CPU a few
            dozen examples give the latency in a fraction of the time.
    """

    formats: list[Literal["int8", "nf4"]] = field(default_factory=list)
    measure: bool = False
    examples: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.examples < 0:
            raise SieveError(f"quantize.examples must be >= 0, got {self.examples}")


@dataclass
class TransferConfig:
    """Cross-dataset check: the base and pruned models scored on other datasets of the same task.

    Args:
        sources: data source (built-in name, local file or hub id) -> label_map renaming its
            label values to this task's (``{drug_reviews: {positive: fresh, negative:
            rotten}}``); an empty map keeps the values.
        examples: examples drawn (seeded) from each source.
    """

    sources: dict[str, dict[str, str]] = field(default_factory=dict)
    examples: int = 500


@dataclass
class ExportConfig:
    """What the pruned model is written as, besides ``<run>/export/model``.

    Args:
        formats: ``hf`` (always: a transformers folder, which the stages after export read)
            and ``gguf`` (llama.cpp / Ollama: ``export/model-<type>.gguf`` for each of
            ``gguf_types``; Llama-architecture models, MLP widths per layer as llama.cpp's
            ``deci`` architecture, attention written dense; next to the transformers files,
            with an Ollama ``Modelfile``), ``standard`` (``export/standard``: the base
            architecture unchanged, one MLP width for every layer: needs ``search.space
            standard``; loads without remote code in any engine) and ``decilm``
            (``export/decilm``: any cut of a Llama-architecture model as vLLM's and SGLang's
            DeciLM / Nemotron-NAS architecture, one MLP width per layer rounded up to a
            multiple of 256 with zero neurons, attention dense; ``--trust-remote-code`` for its
            config class).
        gguf_types: the GGUF weight types: f16, q8_0 (llama.cpp's 8-bit blocks) or f32.
        push_to_hub: a Hugging Face repo id (``user/name``): when the run ends, the export
            (weights, tokenizer, model card, loading code) is uploaded there; needs a token
            (``huggingface-cli login`` or HF_TOKEN). None: nothing leaves this machine.
        private: create that repository private.
    """

    formats: list[Literal["hf", "gguf", "standard", "decilm"]] = field(default_factory=lambda: ["hf"])
    gguf_types: list[Literal["f16", "q8_0", "f32"]] = field(
        default_factory=lambda: ["f16", "q8_0"])
    push_to_hub: str | None = None
    private: bool = True

    def __post_init__(self) -> None:
        self.check()  # a bad value fails where the config is built (parsing), not mid-run

    def check(self) -> None:
        unknown = set(self.formats) - {"hf", "gguf", "standard", "decilm"}
        if unknown or "hf" not in self.formats:
            raise SieveError(f"export.formats must list hf (the stages after export read it) "
                             f"and may add gguf, standard and decilm, got {self.formats}")
        bad = set(self.gguf_types) - {"f16", "q8_0", "f32"}
        if bad or ("gguf" in self.formats and not self.gguf_types):
            raise SieveError(f"export.gguf_types must be some of f16, q8_0, f32, got "
                             f"{self.gguf_types}")
        repo = self.push_to_hub
        if repo is None:
            return
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
            raise SieveError(f"export.push_to_hub must be a repo id like user/name, got {repo!r}")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0"):
            raise SieveError("export.push_to_hub needs the network, but HF_HUB_OFFLINE is set")


def variant_list(found: Searched, confirmed: Confirmed, pruned_accuracy: float,
                 recovered: Recovered, strategy: str) -> list[tuple]:
    """The rows scored, as ``(row, keep, scores known already, weights)``: the base, the
    search's reference points (uniform, each seed), the exported levels, with LoRA when recovery
    ran. Known: at the search's levels, validation accuracy and the confirmation accuracy
    recovery measured; at levels confirmation stepped back to, what the step back measured."""
    variants = [("base", 1.0, {"validation": found.base_accuracy}, {})]
    uniform = found.details["uniform"]
    if strategy == "genetic":
        variants.append(("uniform", uniform["keep"], {"validation": uniform["accuracy"]}, {}))
    for name, seed in (found.details.get("seeds") or {}).items():
        variants.append((f"seed_{name}", seed["levels"], {"validation": seed["accuracy"]}, {}))
    if confirmed.levels == found.levels:
        plain = {"validation": pruned_accuracy,
                 "confirmation": recovered.details.get("confirmation_before")}
        lora = {"validation": recovered.best_val_acc,
                "confirmation": recovered.details.get("confirmation_after")}
    else:  # stepped back: validation is scored afresh
        c = confirmed.details
        lora = {"confirmation": c["accuracy"]} if c.get("with_lora") else {}
        plain = {"confirmation": c.get("without_lora") if c.get("with_lora") else c["accuracy"]}
    known = lambda scores: {k: v for k, v in scores.items() if v is not None}  # noqa: E731
    variants.append(("pruned", confirmed.levels, known(plain), {}))
    if recovered.weights:
        variants.append(("pruned+lora", confirmed.levels, known(lora), recovered.weights))
    return variants


def reference_point(row: str) -> bool:
    """The search's reference rows (uniform, the seeds): scored on test only."""
    return row == "uniform" or row.startswith("seed_")


def evaluate_variants(trainer: L.Trainer, lm: SieveLM, data: TaskDataModule, pruner: Pruner,
                      variants: list[tuple], transfer: TransferConfig, dense_params: int,
                      dense: dict | None) -> tuple[dict, dict, int]:
    """Test accuracy and size of each variant, confirmation accuracy (when the split has
    examples) of every variant but the search's reference points (uniform, the seeds), and
    each transfer source's accuracy of those variants.

    Returns ``(rows, transfer scores, target params)``; ``dense`` (recovery's dense + LoRA
    comparison) adds a row without re-scoring. The model ends at the levels it had.
    """
    test = data.test_dataloader()
    confirm = len(data.splits["confirmation"]) > 0
    rows = {}
    for row, keep, known, weights in variants:
        kept, total = pruner.params(keep)
        with pruner.at(keep, weights):
            rows[row] = {"validation": known.get("validation"),
                         "test": evaluate(trainer, lm, test, f"evaluate {row}/test"),
                         "target_params_kept": kept,
                         "params": dense_params - (total - kept)}
            if rows[row]["validation"] is None:
                rows[row]["validation"] = evaluate(trainer, lm, data.val_dataloader(),
                                                   f"evaluate {row}/validation")
            if confirm and row != "uniform":  # (a seed: does the GA beat it out of sample?)
                rows[row]["confirmation"] = known.get("confirmation")
                if rows[row]["confirmation"] is None:
                    rows[row]["confirmation"] = evaluate(trainer, lm,
                                                         data.confirmation_dataloader(),
                                                         f"evaluate {row}/confirmation")
    scores = {}
    for source, label_map in transfer.sources.items():
        other = data.other_source(source, label_map, transfer.examples)
        scores[source] = {"examples": len(other.splits["test"])}
        for row, keep, _, weights in variants:
            if not reference_point(row):
                with pruner.at(keep, weights):
                    scores[source][row] = evaluate(trainer, lm, other.test_dataloader(),
                                                   f"evaluate {row}/{source}")
    if dense is not None:
        rows["dense+lora"] = {**{k: dense[k] for k in ("validation", "test", "confirmation")
                                 if k in dense},
                              "target_params_kept": total, "params": dense_params}
    return rows, scores, total


def measure_forms(rows: dict, final: str, work: Path, run_path: Path,
                  quantize: QuantizeConfig) -> None:
    """Disk, peak memory and latency of each deployable form, each in a fresh process.

    The base and the exported model are measured as folders; the quantized forms are the
    exported folder loaded through bitsandbytes. Variants that share a structure with a
    measured one (pruned before LoRA, dense + LoRA: merged adapters add no weights) report
    that one's disk, memory and latency.
    """
    forms = [("base", "base", "none"), (final, "pruned", "none")]
    forms += [(f"{final}+{fmt}", "pruned", fmt) for fmt in quantize.formats]
    for row, which, fmt in forms:
        out = work / f"measure-{row}.json"
        command = [sys.executable, "-m", "sieve_pl.cli", "measure",
                   "--config", str(run_path / "config.yaml"), "--evaluate", which,
                   "--quantized", fmt, "--out", str(out),
                   "--examples", str(quantize.examples), "--trainer.devices", "1",
                   "--trainer.strategy", "auto", "--trainer.enable_progress_bar", "false"]
        # a plain one-process run: not a member of this run's torchrun / SLURM job
        env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
        env[PARENT_ENV] = str(os.getpid())  # it ends when this process does (die_with_parent)
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"measuring {row} failed:\n{done.stderr[-2000:]}")
        measured = read_json(out)
        if row in rows:  # scored already on the whole splits: take only the measurements
            rows[row].update({k: measured[k] for k in MEASURES})
        else:
            rows[row] = {"target_params_kept": rows[final]["target_params_kept"],
                         "params": rows[final]["params"], **measured}
    for row, like in (("pruned", final), ("dense+lora", "base")):
        if row in rows and row != like:
            rows[row].update({k: rows[like][k] for k in MEASURES})


class Export(Stage):
    """The model at its levels (with LoRA merged when it is used) as a transformers folder, and
    in the other ``export.formats`` (``gguf.json`` / ``decilm.json`` say what those hold)."""

    name = "export"

    def __init__(self, ctx: Context, pruner: Pruner, levels: dict, weights: dict,
                 config: ExportConfig | None = None):
        self.ctx, self.pruner, self.levels, self.weights = ctx, pruner, levels, weights
        self.config = config or ExportConfig()

    def fingerprint(self) -> dict:
        # the rest of what it writes follows from the stages before it
        formats = self.config.formats
        return {**({"gguf": self.config.gguf_types} if "gguf" in formats else {}),
                **{name: True for name in ("standard", "decilm") if name in formats}}

    def run(self, work: Path) -> None:
        return None

    def save(self, _, folder: Path) -> None:
        net = self.ctx.lm.net
        for name in {"gguf", "decilm"} & set(self.config.formats):
            gguf_check(net, name)  # before anything is written
        with self.pruner.at(self.levels, self.weights):
            save_pruned(net, self.ctx.data.tokenizer, folder / "model")
            if "standard" in self.config.formats:
                save_standard(net, self.ctx.data.tokenizer, folder / "standard")
            if "decilm" in self.config.formats:
                write_json(folder / "decilm.json",
                           save_decilm(net, self.ctx.data.tokenizer, folder / "decilm"))
            if "gguf" in self.config.formats:
                source = self.ctx.lm.pretrained
                source = builtin_gguf(source) if source in BUILTIN_MODELS else None
                written = {f"model-{t}.gguf": write_gguf(
                    net, self.ctx.data.tokenizer, folder / "model" / f"model-{t}.gguf", t, source)
                    for t in self.config.gguf_types}
                write_json(folder / "gguf.json", written)
                # Ollama: ``ollama create <name> -f Modelfile`` (the chat template is the GGUF's)
                smallest = min(written, key=lambda name: written[name]["bytes"])
                (folder / "model" / "Modelfile").write_text(f"FROM ./{smallest}\n")

    def load(self, folder: Path) -> dict:
        """The export's layout (what each unit became), from its config.json."""
        return read_json(folder / "model" / "config.json")["sieve"]


class Evaluate(Stage):
    """The summary: every variant on the test split (and the confirmation split) and the
    transfer sources, the measured forms, and what each stage did."""

    name = "evaluate"

    def __init__(self, ctx: Context, pruner: Pruner, search: SearchConfig, found: Searched,
                 confirmed: Confirmed, compensated: dict[str, Compensated],
                 recovered: Recovered,
                 pruned_accuracy: float, final: str, transfer: TransferConfig,
                 quantize: QuantizeConfig, dense_params: int):
        self.ctx, self.pruner, self.search, self.found = ctx, pruner, search, found
        self.confirmed = confirmed
        self.compensated, self.recovered = compensated, recovered
        self.pruned_accuracy, self.final = pruned_accuracy, final
        self.transfer, self.quantize, self.dense_params = transfer, quantize, dense_params

    def fingerprint(self) -> dict:
        data = self.ctx.data
        return {"data": data.fingerprint_config("confirmation" if data.sizes.confirmation
                                                else "test"),
                "quantize": asdict(self.quantize), "transfer": asdict(self.transfer)}

    def run(self, work: Path) -> dict:
        ctx, found, recovered = self.ctx, self.found, self.recovered
        variants = variant_list(found, self.confirmed, self.pruned_accuracy, recovered,
                                self.search.strategy)
        rows, transfer, total = evaluate_variants(ctx.trainer, ctx.lm, ctx.data, self.pruner,
                                                  variants, self.transfer, self.dense_params,
                                                  recovered.dense)
        if (self.quantize.measure or self.quantize.formats) and ctx.trainer.is_global_zero:
            measure_forms(rows, self.final, work, ctx.path, self.quantize)  # others load it
        return {"strategy": self.search.strategy, "epsilon": self.search.epsilon,
                "relative": self.search.relative, "target_params": total, "rows": rows,
                "final": self.final, "transfer": transfer,
                "pruned_units": len(self.pruner.sizes(self.confirmed.levels)),
                "units": len(self.pruner.names),
                "bottlenecks": found.details.get("bottlenecks", []),
                "confirmation": self.confirmed.details or None,
                "cost": found.details.get("cost"),
                **{name: step.summary() for name, step in self.compensated.items()},
                "recover": {**recovered.summary(), "used": self.final == "pruned+lora",
                            "accuracy_before": self.pruned_accuracy},
                "model_dir": str(ctx.path / "export" / "model")}

    def save(self, report: dict, folder: Path) -> None:
        write_json(folder / "summary.json", report)

    def load(self, folder: Path) -> dict:
        return read_json(folder / "summary.json")
