"""What every task kind provides: column checks, batching, and a prediction per example."""
from __future__ import annotations

import torch

from ..errors import SieveError


class Task:
    """A task kind. Subclasses turn examples into prompts and model outputs into predictions."""

    def config(self) -> dict:
        """The settings that define the task (for stage fingerprints)."""
        return {"kind": type(self).__name__,
                **{k: v for k, v in vars(self).items() if k in self.settings}}

    settings: tuple[str, ...] = ()

    def columns(self) -> list[str]:
        """Dataset columns this task reads."""
        raise NotImplementedError

    def check(self, dataset, tokenizer) -> None:
        """Fail with one clear line on a missing column or unusable setting."""
        missing = [c for c in self.columns() if c not in dataset.column_names]
        if missing:
            raise SieveError(f"dataset has no column {', '.join(map(repr, missing))}; "
                             f"columns: {', '.join(dataset.column_names)}")

    def num_classes(self) -> int:
        raise NotImplementedError

    def collate(self, examples: list[dict], tokenizer, max_length: int) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        raise NotImplementedError

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Training loss on the answer tokens only (recovery)."""
        raise NotImplementedError


def encode_prompts(tokenizer, prompts: list[str], max_length: int) -> dict:
    """Left-padded prompts with position ids that ignore the padding.

    Left padding puts every prompt's next token at the last position, so only that position's
    logits are computed; explicit position ids make the result independent of the padding.
    """
    tokenizer.padding_side, tokenizer.truncation_side = "left", "left"
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length)
    mask = enc["attention_mask"]
    return {"input_ids": enc["input_ids"], "attention_mask": mask,
            "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}


def last_logits(model, batch: dict) -> torch.Tensor:
    """Next-token logits at the last position only (``logits_to_keep=1``)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]
