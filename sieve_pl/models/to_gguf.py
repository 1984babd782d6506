"""A pruned Llama-family model as a GGUF file that llama.cpp (and Ollama) load with their own code.

Every Linear is written at the shape llama.cpp expects: a factored matrix is multiplied back
(``B·A``), a head-narrowed v/o pair is zero-padded back to whole heads (exact: the padded value
dimensions are zero and the output reads nothing from them). Only the MLP widths stay pruned.
One width in every layer is written as the ``llama`` architecture; widths that differ per layer
as ``deci`` (llama.cpp's Nemotron-NAS architecture: the same tensors, ``feed_forward_length``
an array with one width per layer). q and k rows are permuted to llama.cpp's rotary layout, as
llama.cpp's own ``convert_hf_to_gguf.py`` does.

The tokenizer (with its chat template) is copied from the source GGUF of a built-in model;
otherwise it is written from the Hugging Face tokenizer (BPE vocabularies: gguf's ``BpeVocab``
and ``SpecialVocab``; llama.cpp then uses its default pre-tokenizer).
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SieveError
from ..io import atomic
from .factored import HeadPad, HeadSlice, dense_weight
from .hf import mlp_widths

TYPES = ("f32", "f16", "q8_0")
ARCHITECTURES = ("llama",)  # model types written (the deci form covers their pruned MLPs)


def check(model, form: str = "gguf") -> None:
    """Refuse, before any work, a model (or its config) this writer (or the DeciLM one, which
    writes the same dense tensors) cannot express."""
    config = getattr(model, "config", model)
    model_type = config.model_type.removeprefix("sieve_")
    if model_type not in ARCHITECTURES:
        raise SieveError(f"export.formats {form} writes Llama-architecture models "
                         f"({', '.join(ARCHITECTURES)}); this model is {model_type!r}: "
                         f"export it as hf")


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF's rotary layout (halves) to llama.cpp's (interleaved pairs), per head."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def full_weight(module) -> torch.Tensor:
    """The ``out × in`` weight a pruned Linear stands for, at its unpruned shape where llama.cpp
    needs one: a factored matrix multiplied back, a head-narrowed v (``HeadPad``) or o
    (``HeadSlice``) zero-padded to whole heads."""
    if isinstance(module, HeadSlice):
        w = full_weight(module.linear).unflatten(1, (module.heads, module.kept))
        return F.pad(w, (0, module.head_dim - module.kept)).flatten(1, 2)
    if isinstance(module, HeadPad):  # (after HeadSlice, its subclass)
        w = full_weight(module.linear).unflatten(0, (module.heads, module.kept))
        return F.pad(w, (0, 0, 0, module.head_dim - module.kept)).flatten(0, 1)
    return dense_weight(module)  # (a FactoredLinear's weight is B @ A)


def dense_tensors(net):
    """``(GGUF tensor name, float32 weight)`` one at a time (a large model is never held
    twice), in llama.cpp's names and layouts."""
    config = net.config
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    model = net.model
    yield "token_embd.weight", model.embed_tokens.weight
    yield "output_norm.weight", model.norm.weight
    if not config.tie_word_embeddings:
        yield "output.weight", net.lm_head.weight
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        yield f"blk.{i}.attn_norm.weight", layer.input_layernorm.weight
        yield f"blk.{i}.attn_q.weight", _permute(full_weight(attn.q_proj), heads)
        yield f"blk.{i}.attn_k.weight", _permute(full_weight(attn.k_proj), kv)
        yield f"blk.{i}.attn_v.weight", full_weight(attn.v_proj)
        yield f"blk.{i}.attn_output.weight", full_weight(attn.o_proj)
        yield f"blk.{i}.ffn_norm.weight", layer.post_attention_layernorm.weight
        yield f"blk.{i}.ffn_gate.weight", full_weight(mlp.gate_proj)
        yield f"blk.{i}.ffn_up.weight", full_weight(mlp.up_proj)
        yield f"blk.{i}.ffn_down.weight", full_weight(mlp.down_proj)


def write_gguf(net, tokenizer, path: Path, qtype: str = "q8_0",
               source_gguf: Path | None = None) -> dict:
    """Write ``net`` (at its pruned shapes) to ``path``; returns what was written (the
    architecture, the type, each layer's MLP width, the file's bytes)."""
    import gguf

    check(net)
    if qtype not in TYPES:
        raise SieveError(f"export.gguf_types: {qtype!r} is not one of {', '.join(TYPES)}")
    config = net.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise SieveError("export.formats gguf: Linear biases are not written yet; export this "
                         "model as hf")
    widths = mlp_widths(net)
    arch = "llama" if len(set(widths)) == 1 else "deci"
    path = Path(path)
    with atomic(path) as tmp:
        # tensors go to a temporary file as they are converted: one in memory at a time
        writer = gguf.GGUFWriter(str(tmp), arch, use_temp_file=True)
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        writer.add_name("pruned by sieve-pl")  # (the config's name may be a local path)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(widths[0] if arch == "llama" else widths)
        writer.add_head_count(heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(getattr(config, "rope_theta", None)
                                        or rope_theta(config)))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_vocab_size(config.vocab_size)
        writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32,
                              "f16": gguf.LlamaFileType.MOSTLY_F16,
                              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype])
        _tokenizer(writer, tokenizer, source_gguf)
        for name, t in dense_tensors(net):
            data = t.detach().float().cpu().numpy()
            if data.ndim == 1 or qtype == "f32":  # norms stay float32
                writer.add_tensor(name, data.astype(np.float32))
            elif qtype == "q8_0" and data.shape[-1] % 32 == 0:
                q = gguf.GGMLQuantizationType.Q8_0
                writer.add_tensor(name, gguf.quants.quantize(data, q), raw_dtype=q)
            else:  # f16 (and q8_0's fallback for rows that are not whole blocks of 32)
                writer.add_tensor(name, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return {"architecture": arch, "type": qtype, "mlp_widths": widths,
            "bytes": path.stat().st_size}


def rope_theta(config) -> float:
    """transformers 5 keeps rope_theta under rope_parameters."""
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta", 10000.0))


def _tokenizer(writer, tokenizer, source_gguf: Path | None) -> None:
    """The source GGUF's tokenizer fields as they are, else the HF tokenizer's vocabulary."""
    import gguf

    if source_gguf is not None:
        reader = gguf.GGUFReader(str(source_gguf))
        for key, field in reader.fields.items():
            if not key.startswith("tokenizer."):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(key, field.contents(), kind, sub_type=sub)
        return
    with tempfile.TemporaryDirectory() as folder:
        tokenizer.save_pretrained(folder)
        try:
            vocab = gguf.BpeVocab(Path(folder))
        except Exception as err:  # no tokenizer.json / vocab.json of a BPE model
            raise SieveError(f"export.formats gguf: cannot read the tokenizer as BPE "
                             f"({type(err).__name__}: {err}); export this model as hf") from None
        tokens, types = [], []
        for text, _, kind in vocab.all_tokens():
            tokens.append(text)
            types.append(kind)
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        gguf.SpecialVocab(Path(folder), load_merges=True, n_vocab=len(tokens)).add_to_gguf(
            writer)
