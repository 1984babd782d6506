"""Classification by label words: the class whose word has the highest next-token logit."""
from __future__ import annotations

import torch

from ..errors import SieveError
from .base import Task, encode_prompts, last_logits


class Classification(Task):
    """Prompt the model, read the next-token logits of one word per class.

    Args:
        prompt: template with ``{text}`` where the example's text goes.
        label_words: dataset label value -> the word that answers it (leading space matters:
            ``" positive"`` is one token for most BPE vocabularies, ``"positive"`` may not be).
        text_field: column holding the input text.
        label_field: column holding the label value (a key of ``label_words``).
    """

    settings = ("prompt", "label_words", "text_field", "label_field")

    def __init__(
        self,
        prompt: str = "Review: {text}\nSentiment:",
        label_words: dict[str, str] | None = None,
        text_field: str = "text",
        label_field: str = "label",
    ):
        self.prompt = prompt
        self.label_words = dict(label_words or {"fresh": " positive", "rotten": " negative"})
        self.text_field, self.label_field = text_field, label_field
        self.labels = list(self.label_words)
        self.token_ids: list[int] | None = None
        if "{text}" not in prompt:
            raise SieveError("classification prompt must contain '{text}'")
        if len(self.labels) < 2:
            raise SieveError("classification needs at least two label_words")

    def columns(self) -> list[str]:
        return [self.text_field, self.label_field]

    def num_classes(self) -> int:
        return len(self.labels)

    def check(self, dataset, tokenizer) -> None:
        super().check(dataset, tokenizer)
        found = {str(v) for v in dataset.unique(self.label_field)}
        unknown = sorted(found - set(self.labels))
        if unknown:
            raise SieveError(f"label values {unknown} of column {self.label_field!r} have no "
                             f"label word; label_words covers {self.labels}")
        ids = []
        for label, word in self.label_words.items():
            tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
            if len(tokens) != 1:
                raise SieveError(f"label word {word!r} (label {label!r}) is {len(tokens)} tokens "
                                 f"{tokenizer.convert_ids_to_tokens(tokens)}; use a one-token "
                                 f"word (often with a leading space)")
            ids.append(tokens[0])
        if len(set(ids)) != len(ids):
            raise SieveError(f"label words {list(self.label_words.values())} share a token")
        self.token_ids = ids

    def collate(self, examples: list[dict], tokenizer, max_length: int) -> dict:
        batch = encode_prompts(
            tokenizer, [self.prompt.format(text=e[self.text_field]) for e in examples], max_length)
        batch["labels"] = torch.tensor([self.labels.index(str(e[self.label_field]))
                                        for e in examples])
        return batch

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        return last_logits(model, batch)[:, self.token_ids].argmax(-1)

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Cross-entropy of the label word as the next token (the prompt is not a target)."""
        logits = last_logits(model, batch).float()
        targets = torch.tensor(self.token_ids, device=logits.device)[batch["labels"]]
        return torch.nn.functional.cross_entropy(logits, targets)
