"""Save a pruned model as a Hugging Face folder that reloads with ``from_pretrained``.

The folder holds safetensors weights, a config recording every factored matrix's rank
(``sieve_ranks``), and two small Python files (``factored.py``, ``modeling_sieve.py``) referenced
from ``auto_map`` so ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)`` works
with plain transformers, no sieve_pl installed.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from . import factored

MODELING = '''"""A {base} whose target Linears are rank-R factored (written by sieve-pl)."""
from transformers import {base}

from .factored import factorize


class SieveForCausalLM({base}):
    def __init__(self, config):
        super().__init__(config)
        factorize(self, getattr(config, "sieve_ranks", None) or {{}})
'''


def save_pruned(net, tokenizer, ranks: dict[str, int], out: Path) -> None:
    """Write ``net`` (already carrying FactoredLinears of these ranks) to ``out``."""
    out = Path(out)
    config = net.config
    base = type(net).__name__
    saved = {k: getattr(config, k, None) for k in ("sieve_ranks", "auto_map", "architectures")}
    config.sieve_ranks = dict(ranks)
    config.auto_map = {"AutoModelForCausalLM": "modeling_sieve.SieveForCausalLM"}
    config.architectures = ["SieveForCausalLM"]
    try:
        net.save_pretrained(out)
    finally:
        for key, value in saved.items():  # leave the in-memory config as it was
            if value is None:
                config.__dict__.pop(key, None)
            else:
                setattr(config, key, value)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    shutil.copyfile(factored.__file__, out / "factored.py")
    (out / "modeling_sieve.py").write_text(MODELING.format(base=base))
