"""``sieve-pl plan``: what each stage will need — accelerator memory, host memory, disk, time —
from the model's config alone (a meta-device model: no weight is read) and the task's data
(its token counts), before anything is spent.

The memory model follows what each stage holds (README, "Memory"):

- calibrate, project: one decoder layer on the accelerator (its weights, its input
  statistics, a batch's activations / one unit's decomposition workspace), the model waiting
  on the host (calibration also caches every calibration example's hidden states there);
- sensitivity, search, evaluate, recover: the whole model where ``model.placement`` puts it —
  on each process's accelerator (DDP: one copy per process), or split over the GPUs — plus
  the pruned copies of the units being scored (at most the target weights again), and a
  batch's activations; the sensitivity sums and bases wait on the host.

Times are flops over a throughput (``--tflops``; decompositions at a tenth of it): orders of
magnitude, not promises. Host figures include ``RUNTIME_MB`` for Python, torch and the
libraries. ``check`` turns the plan into a refusal before any weight loads.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import SieveError
from .maths import PRODUCT_BLOCK
from .models.factored import dense_shape
from .models.pruning import PARK_ABOVE
from .units import HeadSpec, NeuronSpec

RUNTIME_MB = 700.0  # Python, torch, transformers, Lightning and the tokenizer in memory
MB = 2 ** 20


@dataclass
class Estimate:
    """One stage: peak accelerator memory per device, peak host memory, disk written, time."""

    stage: str
    accelerator_mb: float
    host_mb: float
    disk_mb: float
    seconds: float
    note: str = ""


@dataclass
class Shapes:
    """What the estimates read off a meta-device model and the data."""

    layers: int
    layer_bytes: float  # one decoder layer's weights
    model_bytes: float
    target_bytes: float  # every target Linear's weights
    hidden: int
    heads: int
    vocab: int
    element: int  # bytes per weight
    stats: list[int]  # input width of each input group of one layer
    units: list  # specs of one layer's units (with their dense shapes)
    shapes: dict  # Linear name -> (out, in), first layer
    calibration_tokens: int
    batch_tokens: int  # the largest padded batch (batch × length)
    examples: dict  # split -> examples


def shapes(lm, data, projection) -> Shapes:
    """The model built on the meta device from its config, and the task's token counts."""
    from transformers import AutoModelForCausalLM

    from .models.loading import load_config
    from .stages.project import unit_specs

    config = load_config(lm.pretrained, lm.trust_remote_code)
    dtype = getattr(torch, lm.dtype_name)
    with torch.device("meta"):
        net = AutoModelForCausalLM.from_config(config, dtype=dtype,
                                               trust_remote_code=lm.trust_remote_code)
    adapter = lm.check()
    groups = adapter.input_groups(net)
    first = {k: v for k, v in groups.items() if k.rpartition(".")[0].endswith(".0")}
    layers = net.get_submodule(adapter.layers)
    specs = unit_specs(first, projection, adapter.mlps(net),
                       adapter.attentions(net) if projection.attention == "heads" else {})
    element = torch.finfo(dtype).bits // 8
    targets = [n for names in groups.values() for n in names]
    lengths, batch_tokens = [], 0
    for batch in data.loader("calibration"):
        mask = batch["attention_mask"]
        lengths += mask.sum(1).tolist()
        batch_tokens = max(batch_tokens, mask.numel())
    for split in ("validation", "test"):
        for batch in data.loader(split, limit=64):
            batch_tokens = max(batch_tokens, batch["attention_mask"].numel())
    text = getattr(net.config, "get_text_config", lambda: net.config)()
    return Shapes(
        layers=len(layers), layer_bytes=sum(p.numel() for p in layers[0].parameters()) * element,
        model_bytes=sum(p.numel() for p in net.parameters()) * element,
        target_bytes=sum(net.get_submodule(n).weight.numel() for n in targets) * element,
        hidden=text.hidden_size, heads=text.num_attention_heads, vocab=text.vocab_size,
        element=element,
        stats=[dense_shape(net.get_submodule(v[0]))[1] for v in first.values()],
        units=list(specs.values()),
        shapes={n: dense_shape(net.get_submodule(n)) for v in first.values() for n in v},
        calibration_tokens=int(sum(lengths)), batch_tokens=batch_tokens,
        examples={s: len(data.splits[s]) for s in data.splits})


def _unit_workspace(spec, shapes: dict, element: int) -> tuple[float, float, float]:
    """One unit's fit: (bytes of its working set, bytes of its stored basis, flops)."""
    out_features, in_features = shapes[spec.output]
    if isinstance(spec, NeuronSpec):  # W, W R; C, C_λ and the Cholesky columns (I × I each)
        i, h = in_features, out_features
        return (2 * h * i + 3 * i * i) * element, (h * i + i * i / 2 + 64 * i) * 4 + 8 * i, \
            4.0 * h * i * i + i ** 3
    if isinstance(spec, HeadSpec):
        d = spec.head_dim
        return (3 * out_features * in_features + in_features ** 2) * element, \
            (spec.kv + spec.heads) * d * d * 4, 4.0 * out_features * in_features * d
    h, d = out_features, in_features
    k = h * d // (h + d)
    return (3 * h * h + h * d + d * d) * element, h * k * 4, 10.0 * h ** 3 + 2.0 * h * d * d


def estimate(s: Shapes, calibration, search, recover, gpus: int, tflops: float,
             split: bool = False, batch: int = 16) -> list[Estimate]:
    """Per-stage estimates on ``gpus`` accelerators (0: everything on the host; ``split``: the
    whole-model stages spread the model over the GPUs, one process); ``batch``: examples per
    batch."""
    rows: list[Estimate] = []

    def row(stage, device, host, disk, flops, note="", slow=1.0):
        """On a GPU the device part is per GPU; on the host both parts add up."""
        seconds = flops / (tflops * 1e12 / slow)
        if gpus:
            rows.append(Estimate(stage, device / MB, host / MB + RUNTIME_MB, disk / MB,
                                 seconds, note))
        else:
            rows.append(Estimate(stage, 0.0, (device + host) / MB + RUNTIME_MB, disk / MB,
                                 seconds, note))

    stat_bytes = 8 if calibration.dtype == "float64" else 4
    layer_stats = sum(d * d for d in s.stats) * stat_bytes
    h, t = s.hidden, s.batch_tokens
    inner = max(shape[1] for shape in s.shapes.values())
    acts = t * (6 * h + 3 * inner) * 4  # one layer's activations for the largest batch
    params = s.model_bytes / s.element
    tokens = s.calibration_tokens
    model_here = s.model_bytes / (gpus if split and gpus else 1)
    skeleton = s.model_bytes - s.layers * s.layer_bytes
    cache = tokens * h * s.element  # every calibration example's hidden states, one layer deep
    # calibrate: one layer and its sums on the device (and one block of a product Xᵀ X before
    # it is added), the model and the cache on the host
    largest_stat = max(d * d for d in s.stats) * stat_bytes
    product = PRODUCT_BLOCK * 4
    row("calibrate", (skeleton + s.layer_bytes if gpus else 0) + layer_stats + product + acts,
        s.model_bytes + cache, s.layers * layer_stats,
        2 * tokens * (params + s.layers * sum(d * d for d in s.stats)), "one layer at a time")
    # project: one unit's decomposition at a time; a statistic read in full from disk
    # (on the host the float64 read is freed once its float32 copy is in the workspace)
    fits = [_unit_workspace(u, s.shapes, 4) for u in s.units]
    layer_bases = sum(f[1] for f in fits)
    workspace = max(f[0] for f in fits)
    row("project", s.layer_bytes + workspace if gpus else 0,
        s.model_bytes + layer_bases + (largest_stat if gpus else
                                       max(largest_stat * (1 + 4 / stat_bytes), workspace)),
        s.layers * layer_bases,
        s.layers * sum(f[2] for f in fits), "one layer at a time", slow=10)
    # sensitivity: frozen weights; each layer's input kept (activations recomputed on an
    # accelerator), the Fisher sums of every unit output on the host
    outs = {u.output for u in s.units}
    fisher = s.layers * sum(s.shapes[o][0] ** 2 for o in outs) * 4
    kept = t * h * s.element * s.layers + acts if gpus else t * (8 * h + 4 * inner) * 4 * s.layers
    row("sensitivity", model_here + kept, fisher, 0, 6 * tokens * params, "part of search")
    # search: the model, pruned copies of at most every target weight beside the dense ones;
    # on the host above PARK_ABOVE the dense weights of pruned units wait on disk, so the model
    # is held once, plus the unit being rebuilt (its dense weights read back, its new modules)
    scored = (s.examples.get("validation", 0) * search.population * (search.generations + 1)
              * tokens / max(s.examples.get("calibration", 1), 1) / 4)
    pruned = s.target_bytes / (gpus if split and gpus else 1)
    if not gpus and s.target_bytes > PARK_ABOVE:
        pruned = 2 * max(sum(math.prod(s.shapes[n]) for n in u.linears) for u in s.units) \
            * s.element
    row("search", model_here + pruned + acts, 0, 0,
        2 * scored * params, "a GA scores about a quarter of its genomes in full")
    row("evaluate", model_here + acts, 0, s.model_bytes, 2 * params * tokens * 4)
    if recover.enabled:
        lora = s.layers * 7 * recover.rank * 2 * h * 4 * 4  # weights, grads, Adam (fp32)
        train = t * h * s.layers * (2 if recover.gradient_checkpointing else 34) * 2
        shrink = {"nf4": 4.5 / 8 / s.element * 2, "int8": 1 / s.element}.get(recover.quantize, 1)
        step_tokens = (recover.batch_size or batch) * tokens / max(s.examples["calibration"], 1)
        row("recover", model_here * shrink + lora + train, 0, lora,
            6 * max(recover.steps, 1) * step_tokens * params * (2 if recover.compare_dense else 1))
    return rows


def check(rows: list[Estimate], gpus: int, gpu_mb: float | None, host_mb: float | None) -> None:
    """One line, before any weight loads, when a stage cannot fit."""
    for row in rows:
        if gpus and gpu_mb and row.accelerator_mb > gpu_mb:
            raise SieveError(f"{row.stage} needs about {row.accelerator_mb / 1024:.1f} GiB per "
                             f"GPU, more than {gpu_mb / 1024:.1f} GiB; run `sieve-pl plan` "
                             f"(more GPUs with model.placement split, model.dtype bfloat16, "
                             f"smaller data.batch_size)")
        if host_mb and row.host_mb > host_mb:
            raise SieveError(f"{row.stage} needs about {row.host_mb / 1024:.1f} GiB of host "
                             f"memory, more than this machine's {host_mb / 1024:.1f} GiB; run "
                             f"`sieve-pl plan`")


def table(rows: list[Estimate], gpus: int) -> str:
    where = f"per GPU ({gpus})" if gpus else "(none: host)"
    lines = [f"| stage | accelerator {where} | host | disk | time | |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.stage} | {_size(r.accelerator_mb) if gpus else '-'} | "
                     f"{_size(r.host_mb)} | {_size(r.disk_mb)} | {_time(r.seconds)} | "
                     f"{r.note} |")
    return "\n".join(lines)


def _size(mb: float) -> str:
    return f"{mb / 1024:.1f} GiB" if mb >= 1024 else f"{mb:.0f} MiB"


def _time(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"
