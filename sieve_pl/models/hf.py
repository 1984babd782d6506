"""Save a pruned model as a Hugging Face folder that reloads with ``from_pretrained`` — and only
as itself.

The folder holds safetensors weights, the tokenizer, two small Python files (``factored.py``,
``modeling_sieve.py``) and a config whose ``model_type`` is ``sieve_<base type>`` with the
layout under ``sieve``: the rank of every factored matrix, the shape of every resized Linear
(MLPs that kept fewer neurons) and the kept dimensions of every head-narrowed v/o pair. Plain transformers does not know that model type, so loading
without ``trust_remote_code=True`` raises instead of silently building the base architecture
with random weights where the pruned ones differ; with it, ``auto_map`` points at the folder's
classes and no sieve_pl is needed. sieve_pl itself registers the same classes from its own code
(:func:`register`), so it never runs a folder's code to load an export.

The tokenizer needs no code: ``tokenizer_config.json`` names a tokenizer class every supported
transformers knows, so transformers 4 reads that file alone (transformers 5 also reads
``config.json`` first: ``trust_remote_code=False`` loads the tokenizer there without a prompt).
The config's standard MLP size is the widest MLP the model holds, not the unpruned one.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from . import factored
from .adapters import adapter_for

PREFIX = "sieve_"
# transformers 5's generic fast tokenizer under the name transformers 4 gives it (5 maps it back)
PORTABLE_TOKENIZERS = {"TokenizersBackend": "PreTrainedTokenizerFast"}
# tokenizer_config.json entries that describe the machine that wrote it, not the tokenizer
LOCAL_TOKENIZER_KEYS = ("is_local", "local_files_only")

MODELING = '''"""A {model} with factored / resized Linears (written by sieve-pl)."""
from transformers import {config}, {model}

from .factored import rebuild


class Sieve{config}({config}):
    model_type = "{model_type}"


class Sieve{model}({model}):
    config_class = Sieve{config}

    def __init__(self, config):
        super().__init__(config)
        rebuild(self, getattr(config, "sieve", None) or {{}})
'''


def _base_classes(base_type: str):
    """The base architecture's config and causal-LM classes."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    config_cls = CONFIG_MAPPING[base_type]
    return config_cls, MODEL_FOR_CAUSAL_LM_MAPPING[config_cls]


def register(model_type: str) -> None:
    """Make ``sieve_<base>`` loadable by transformers' Auto classes with sieve_pl's own code
    (a no-op for other model types or when already registered)."""
    if not model_type.startswith(PREFIX):
        return
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        return
    base_config, base_model = _base_classes(model_type.removeprefix(PREFIX))
    config_cls = type(f"Sieve{base_config.__name__}", (base_config,), {"model_type": model_type})

    def __init__(self, config):
        base_model.__init__(self, config)
        factored.rebuild(self, getattr(config, "sieve", None) or {})

    model_cls = type(f"Sieve{base_model.__name__}", (base_model,),
                     {"config_class": config_cls, "__init__": __init__})
    AutoConfig.register(model_type, config_cls)
    AutoModelForCausalLM.register(config_cls, model_cls)


def layout(net) -> dict:
    """``{"ranks": …, "shapes": …}``: how ``net`` differs from its unpruned architecture."""
    base_model = _base_classes(net.config.model_type.removeprefix(PREFIX))[1]
    with torch.device("meta"):
        reference = base_model(net.config)
    return factored.structure(net, reference)


def mlp_widths(net) -> list[int]:
    """How many neurons each layer's MLP holds (its down projection's inputs), in layer order."""
    widths = []
    for _, down, _ in adapter_for(net.config).mlps(net).values():
        module = net.get_submodule(down)
        widths.append(getattr(module, "in_features", None) or factored.dense_shape(module)[1])
    return widths


def _save_tokenizer(tokenizer, out: Path) -> None:
    """The tokenizer without the padding / truncation this process's batches set, under a
    class name that loads without the model's code (see the module docstring)."""
    tokenizer = copy.deepcopy(tokenizer)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    tokenizer.save_pretrained(out)
    path = out / "tokenizer_config.json"
    config = json.loads(path.read_text())
    name = config.get("tokenizer_class") or type(tokenizer).__name__
    config["tokenizer_class"] = PORTABLE_TOKENIZERS.get(name, name)
    for key in LOCAL_TOKENIZER_KEYS:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_weights(net, out: Path) -> None:
    """``save_pretrained`` with the files as readable as any other file the user writes:
    transformers writes the weights through a private temporary file (mode 0600), which a
    serving engine running as another user (a vLLM or llama.cpp container) cannot read."""
    net.save_pretrained(out)
    umask = os.umask(0)
    os.umask(umask)
    for path in Path(out).iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def save_pruned(net, tokenizer, out: Path) -> dict:
    """Write ``net`` (carrying its pruned modules) to ``out``; returns its layout."""
    out = Path(out)
    shape = layout(net)
    base_type = net.config.model_type.removeprefix(PREFIX)
    _save_weights(net, out)
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)
    config_cls, model_cls = _base_classes(base_type)
    config = json.loads((out / "config.json").read_text())
    widths = mlp_widths(net)
    if widths:  # the standard field states the widest MLP held; ``shapes`` resizes the others
        *parents, key = adapter_for(net.config).mlp_size.split(".")
        section = config
        for parent in parents:
            section = section[parent]
        section[key] = max(widths)
        shape = {**shape, "intermediate_sizes": widths}
    config.update({"model_type": PREFIX + base_type, "sieve": {"base_model_type": base_type,
                                                             **shape},
                   "architectures": [f"Sieve{model_cls.__name__}"],
                   "auto_map": {"AutoConfig": f"modeling_sieve.Sieve{config_cls.__name__}",
                                "AutoModelForCausalLM": f"modeling_sieve.Sieve{model_cls.__name__}"}})
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(factored.__file__, out / "factored.py")
    (out / "modeling_sieve.py").write_text(MODELING.format(
        config=config_cls.__name__, model=model_cls.__name__, model_type=PREFIX + base_type))
    return shape


def save_standard(net, tokenizer, out: Path) -> None:
    """Write ``net`` as its base architecture, unchanged (``LlamaForCausalLM``…): loadable by
    plain ``from_pretrained`` without remote code and by any engine that knows the base. Only
    models whose pruned units are MLPs of one width in every layer have such a form
    (``search.space: standard``); the config's MLP size is that width."""
    from ..errors import SieveError

    out = Path(out)
    shape, widths = layout(net), mlp_widths(net)
    if shape.get("ranks") or shape.get("heads") or len(set(widths)) > 1:
        raise SieveError("export.formats standard needs one MLP width in every layer and no "
                         "factored or narrowed attention (search.space standard)")
    config = copy.deepcopy(net.config)
    *parents, key = adapter_for(config).mlp_size.split(".")
    section = config
    for parent in parents:
        section = getattr(section, parent)
    setattr(section, key, widths[0])
    held, net.config = net.config, config
    try:
        _save_weights(net, out)
    finally:
        net.config = held
    if tokenizer is not None:
        _save_tokenizer(tokenizer, out)


def push_to_hub(folder: Path, repo_id: str, private: bool = True) -> str:
    """Upload an export folder (weights, tokenizer, code, model card) to a hub repository;
    returns the commit URL. The token comes from ``huggingface-cli login`` or ``HF_TOKEN``."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id,
                                 commit_message="sieve-pl export"))
