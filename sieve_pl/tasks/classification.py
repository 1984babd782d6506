"""Classification by label words: the class whose word the model finds likeliest after the prompt."""
from __future__ import annotations

import torch

from ..errors import SieveError
from ..models.forward import answer_loss, last_logits
from .base import (Task, check_template, encode_prompts, field_text, graded, margin,
                   option_logliks, pad_id, pad_tokens, require_scalar, with_answers)


class Classification(Task):
    """Prompt the model with a text; the predicted class is the label word it finds most likely.

    Each class is answered by a word or phrase (``label_words``). When every label word is one
    token, one forward with the last position's logits scores all classes. Longer words are
    scored by the summed log-likelihood of their tokens given the prompt (the prompt runs once,
    each word's tokens on top of it). Metric: accuracy. Recovery loss: cross-entropy on the
    label word's tokens (the prompt is not a target). Calibration sees the prompts.

    Args:
        prompt: template with ``{text}`` where the example's text goes.
        label_words: dataset label value -> the word or phrase that answers it (two or more
            classes). The leading space matters: ``" positive"`` is one token for most BPE
            vocabularies, ``"positive"`` may not be. Words must differ in their tokens.
        text_field: column holding the input text (``a.b`` reads field ``b`` of a column ``a``
            of records; a list is joined by newlines).
        label_field: column holding the label value (a key of ``label_words``; numbers are
            matched as text, so ``{"0": " negative", "1": " positive"}`` fits integer labels).
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
        self.label_words = {str(k): v for k, v in
                            (label_words or {"fresh": " positive", "rotten": " negative"}).items()}
        self.text_field, self.label_field = text_field, label_field
        self.labels = list(self.label_words)
        self.label_tokens: list[list[int]] | None = None
        if "{text}" not in prompt:
            raise SieveError("classification prompt must contain '{text}'")
        check_template(prompt, {"text"}, "classification")
        if len(self.labels) < 2:
            raise SieveError("classification needs at least two label_words")

    def columns(self) -> list[str]:
        return [self.text_field, self.label_field]

    def prompt_fields(self) -> list[str]:
        return [self.text_field]

    def prompt_text(self, example: dict) -> str:
        return self.prompt.format(text=field_text(example, self.text_field))

    def num_classes(self) -> int:
        return len(self.labels)

    def check(self, dataset, tokenizer) -> None:
        super().check(dataset, tokenizer)
        require_scalar(dataset, self.label_field, "label")
        found = {str(v) for v in dataset.unique(self.label_field)}
        unknown = sorted(found - set(self.labels))
        if unknown:
            raise SieveError(f"label values {unknown} of column {self.label_field!r} have no "
                             f"label word; label_words covers {self.labels}")
        self.label_tokens = label_word_tokens(tokenizer, self.label_words)

    def _tokenize(self, tokenizer) -> list[list[int]]:
        if self.label_tokens is None:
            self.label_tokens = label_word_tokens(tokenizer, self.label_words)
        return self.label_tokens

    @property
    def single_token(self) -> bool:
        return all(len(t) == 1 for t in self.label_tokens)

    def collate(self, examples: list[dict], tokenizer, max_length: int,
                labelled: bool = True) -> dict:
        tokens = self._tokenize(tokenizer)
        batch = self.encode(tokenizer, [self.prompt_text(e) for e in examples], max_length)
        if labelled:
            batch["labels"] = torch.tensor([self.labels.index(str(e[self.label_field]))
                                            for e in examples])
        if not self.single_token:  # every class's tokens, for scoring and the loss
            ids, mask = pad_tokens(tokens, pad_id(tokenizer))
            batch["choice_ids"] = ids.expand(len(examples), -1, -1).contiguous()
            batch["choice_mask"] = mask.expand(len(examples), -1, -1).contiguous()
        return batch

    @torch.no_grad()
    def class_scores(self, model, batch: dict) -> torch.Tensor:
        """Log-likelihood of each class's label word given the prompt (batch × classes)."""
        return self._class_scores(model, batch)

    def _class_scores(self, model, batch: dict) -> torch.Tensor:
        if "choice_ids" not in batch:  # every word one token: last-position logits only
            ids = torch.tensor([t[0] for t in self.label_tokens], device=batch["input_ids"].device)
            return last_logits(model, batch).float().log_softmax(-1)[:, ids]
        return option_logliks(model, batch, batch["choice_ids"], batch["choice_mask"])

    def answer_logprobs(self, model, batch: dict) -> torch.Tensor:
        """The label words' log-likelihoods renormalised over the classes (log-softmax):
        the model's distribution over the answers the metric compares."""
        return self._class_scores(model, batch).log_softmax(-1)

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        """The predicted class index of every example."""
        return self.class_scores(model, batch).argmax(-1)

    @torch.no_grad()
    def scores(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"accuracy": (self.predict(model, batch) == batch["labels"]).float()}

    @torch.no_grad()
    def confidence(self, model, batch: dict) -> torch.Tensor:
        """Log-likelihood margin of the right label word over the best wrong one."""
        return margin(self.class_scores(model, batch), batch["labels"])

    @torch.no_grad()
    def graded(self, model, batch: dict) -> torch.Tensor:
        return graded(self.class_scores(model, batch), batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Cross-entropy of the label word's tokens after the prompt (not a target itself)."""
        if "choice_ids" not in batch:
            logits = last_logits(model, batch).float()
            targets = torch.tensor([t[0] for t in self.label_tokens],
                                   device=logits.device)[batch["labels"]]
            return torch.nn.functional.cross_entropy(logits, targets)
        rows = torch.arange(len(batch["labels"]), device=batch["labels"].device)
        ids = batch["choice_ids"][rows, batch["labels"]]
        mask = batch["choice_mask"][rows, batch["labels"]]
        return answer_loss(model, with_answers(batch, ids, mask))


def label_word_tokens(tokenizer, words: dict[str, str]) -> list[list[int]]:
    """Token ids of each answer word; empty words and words with identical tokens are errors."""
    tokens = []
    for label, word in words.items():
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SieveError(f"label word {word!r} (label {label!r}) has no tokens")
        if tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids:
            raise SieveError(f"label word {word!r} (label {label!r}) is not in the model's "
                             f"vocabulary: it tokenizes to {tokenizer.convert_ids_to_tokens(ids)}")
        tokens.append(ids)
    seen: dict[tuple, str] = {}
    for (label, word), ids in zip(words.items(), tokens):
        if tuple(ids) in seen:
            raise SieveError(f"label words {seen[tuple(ids)]!r} and {word!r} are the same tokens "
                             f"{tokenizer.convert_ids_to_tokens(ids)}; they cannot be told apart")
        seen[tuple(ids)] = word
    return tokens
