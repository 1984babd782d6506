"""A pruned Llama-family model as a DeciLM (Nemotron-NAS) folder, the per-layer architecture
vLLM and SGLang serve natively (``DeciLMForCausalLM``, ``model_type: nemotron-nas``).

Each layer's block config gives its MLP width as ``ffn_mult`` and its attention as
``n_heads_in_group`` (query heads per kv head). The engines turn ``ffn_mult`` into a width with
``find_multiple(int(2·ffn_mult·hidden/3), 256)``, so every MLP is zero-padded to a multiple of
256 neurons: exact (a zero gate and up row make a zero activation, a zero down column adds
nothing), at the cost of the padding. Attention is written dense (factored matrices multiplied
back, narrowed v/o zero-padded to whole heads), as for GGUF. Tensor names are Llama's.

The engines read ``block_configs`` through the config class of NVIDIA's checkpoints
(``configuration_decilm.py``, remote code); the folder carries its own small class of that
name so that ``--trust-remote-code`` finds one offline. Not run in vLLM here (no GPU, no vLLM);
``tests/test_exports.py`` builds each layer the way vLLM's ``nemotron_nas.py`` does and checks
the logits.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from ..artifacts import save_tensors
from ..errors import SieveError
from .hf import _save_tokenizer, mlp_widths
from .to_gguf import check, full_weight, rope_theta

MULTIPLE = 256  # DeciLM's MLP width granularity (``_find_multiple(…, 256)``)

CONFIG_CODE = '''\
"""DeciLM (Nemotron-NAS) config: per-layer block configs with attribute access, as vLLM's and
SGLang's DeciLM models read them (``block_config.ffn.ffn_mult``). Written by sieve-pl."""
from transformers import LlamaConfig


class Fields(dict):
    """A JSON-serialisable dict whose keys also read as attributes."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(LlamaConfig):
    model_type = "nemotron-nas"

    def __init__(self, block_configs=None, **kwargs):
        self.block_configs = [Fields({k: Fields(v) if isinstance(v, dict) else v
                                      for k, v in b.items()}) for b in block_configs or []]
        super().__init__(**kwargs)
'''


def width(ffn_mult: float, hidden: int) -> int:
    """The MLP width an engine builds from ``ffn_mult`` (vLLM's ``_ffn_mult_to_intermediate_size``)."""
    n = int(2 * ffn_mult * hidden / 3)
    return n if n % MULTIPLE == 0 else n + MULTIPLE - n % MULTIPLE


def ffn_mult(neurons: int, hidden: int) -> float:
    """The ``ffn_mult`` that an engine reads back as ``neurons`` padded to a multiple of 256."""
    padded = -(-neurons // MULTIPLE) * MULTIPLE
    mult = padded * 3 / (2 * hidden)
    if width(mult, hidden) != padded:  # float rounding that the formula does not absorb
        raise SieveError(f"export.formats decilm: no ffn_mult gives {padded} neurons at "
                         f"hidden size {hidden}")
    return mult


def _shards(net, padded: list[int]):
    """``{name: tensor}`` per shard (the embeddings and final norm, then one per layer, so one
    layer's dense weights are held at a time), in Llama's names: dense attention, MLPs
    zero-padded to ``padded``."""
    model = net.model
    first = {"model.embed_tokens.weight": model.embed_tokens.weight,
             "model.norm.weight": model.norm.weight}
    if not net.config.tie_word_embeddings:
        first["lm_head.weight"] = net.lm_head.weight
    yield first
    for i, layer in enumerate(model.layers):
        prefix = f"model.layers.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        shard = {prefix + "input_layernorm.weight": layer.input_layernorm.weight,
                 prefix + "post_attention_layernorm.weight": layer.post_attention_layernorm.weight}
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shard[f"{prefix}self_attn.{name}.weight"] = full_weight(getattr(attn, name))
        for name in ("gate_proj", "up_proj"):
            w = full_weight(getattr(mlp, name))
            shard[f"{prefix}mlp.{name}.weight"] = F.pad(w, (0, 0, 0, padded[i] - w.shape[0]))
        w = full_weight(mlp.down_proj)
        shard[prefix + "mlp.down_proj.weight"] = F.pad(w, (0, padded[i] - w.shape[1]))
        yield shard


def save_decilm(net, tokenizer, out: Path) -> dict:
    """Write ``net`` (at its pruned shapes) to ``out`` as a DeciLM folder; returns each layer's
    MLP width as held and as written (padded)."""
    check(net, "decilm")
    config = net.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SieveError("export.formats decilm: Linear biases are not written yet; export this "
                         "model as hf")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hidden = config.hidden_size
    held = mlp_widths(net)
    mults = [ffn_mult(w, hidden) for w in held]
    padded = [width(m, hidden) for m in mults]
    dtype = next(net.parameters()).dtype
    if not dtype.is_floating_point:
        dtype = torch.bfloat16
    group = config.num_attention_heads // config.num_key_value_heads
    weight_map, total, count = {}, 0, config.num_hidden_layers + 1
    for i, shard in enumerate(_shards(net, padded), 1):
        name = f"model-{i:05d}-of-{count:05d}.safetensors"
        shard = {k: t.detach().to(dtype) for k, t in shard.items()}
        save_tensors(shard, out / name, {"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        total += sum(t.numel() * t.element_size() for t in shard.values())
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2,
        sort_keys=True) + "\n")
    fields = config.to_dict()
    for key in ("intermediate_size", "auto_map", "sieve", "_name_or_path"):
        fields.pop(key, None)
    fields.update({
        "architectures": ["DeciLMForCausalLM"], "model_type": "nemotron-nas",
        "auto_map": {"AutoConfig": "configuration_decilm.DeciLMConfig"},
        "dtype": str(dtype).removeprefix("torch."),
        "torch_dtype": str(dtype).removeprefix("torch."),  # (transformers 4's name)
        "block_configs": [{"attention": {"n_heads_in_group": group, "no_op": False,
                                         "replace_with_linear": False},
                           "ffn": {"ffn_mult": m, "no_op": False, "replace_with_linear": False}}
                          for m in mults]})
    fields.setdefault("rope_theta", rope_theta(config))  # (older readers; 5 nests it)
    (out / "config.json").write_text(json.dumps(fields, indent=2, sort_keys=True) + "\n")
    (out / "configuration_decilm.py").write_text(CONFIG_CODE)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    return {"mlp_widths": held, "written_widths": padded}
