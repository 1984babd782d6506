"""Generation: a free-text answer to a question (optionally from retrieved context, RAG)."""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Literal

import torch

from ..errors import SieveError
from ..models.forward import answer_loss, greedy_decode
from .base import (Task, check_template, encode_prompts, field_text, field_value, pad_id,
                   pad_tokens, prompt_part, with_answers)


class Generation(Task):
    """Answer in free text (extractive / RAG QA); greedy decoding, exact match and token F1.

    The model continues the prompt greedily for at most ``max_new_tokens`` tokens; the answer
    ends at the end-of-sequence token or before the first ``stop`` string. It is scored against
    the reference answer(s) after SQuAD normalisation (lowercase, no punctuation, no articles
    a/an/the, single spaces): exact match (0/1) and token-level F1, each the best over the
    references. Both are reported; ``metric`` picks the one the search keeps within epsilon.
    Calibration sees the prompt followed by the first reference answer, and recovery's loss is
    the cross-entropy of those answer tokens (the prompt is not a target).

    There is no finite answer set (``answer_logprobs`` is None): fidelity compares greedy
    answers (``reference``: the generated token ids; ``agreement``: the primary metric of the
    model's answer against the reference's), and distillation is sequence-level: the
    cross-entropy of the dense model's own greedy answer tokens (``self_loss``).

    Args:
        question_field: column holding the question.
        answer_field: column holding the reference answer: a string, or a list of acceptable
            answers (SQuAD: ``answers.text`` reads field ``text`` of column ``answers``). The
            first one is the calibration / training target.
        context_field: optional column with context inserted at ``{context}`` (retrieved
            passages; a list is joined by newlines).
        prompt: template with ``{question}`` and ``{context}`` (required with
            ``context_field``). Left empty, ``Context: …\\nQuestion: …\\nAnswer:``.
        max_new_tokens: most tokens generated per answer (reference answers used as training
            targets are cut to this length too).
        stop: strings that end an answer (the text from the first one on is dropped). The
            training target is the reference followed by the first of them (end-of-sequence
            when the list is empty), so recovery teaches the model where to stop.
        metric: ``f1`` or ``exact_match``: the primary metric (search, checkpoints).
    """

    settings = ("question_field", "answer_field", "context_field", "prompt", "max_new_tokens",
                "stop", "metric")

    def __init__(
        self,
        question_field: str = "question",
        answer_field: str = "answer",
        context_field: str | None = None,
        prompt: str | None = None,
        max_new_tokens: int = 32,
        stop: list[str] | None = None,
        metric: Literal["f1", "exact_match"] = "f1",
    ):
        self.question_field, self.answer_field = question_field, answer_field
        self.context_field = context_field
        if prompt is None:
            prompt = ("Context: {context}\n" if context_field else "") + \
                "Question: {question}\nAnswer:"
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.stop = ["\n"] if stop is None else list(stop)
        self.metric = metric
        if metric not in ("f1", "exact_match"):
            raise SieveError(f"generation metric must be f1 or exact_match, got {metric!r}")
        if "{question}" not in prompt:
            raise SieveError("generation prompt must contain '{question}'")
        check_template(prompt, {"question", "context"}, "generation")
        if bool(context_field) != ("{context}" in prompt):
            raise SieveError("generation prompt must contain '{context}' exactly when "
                             "context_field is set")
        if max_new_tokens < 1:
            raise SieveError("generation max_new_tokens must be >= 1")
        if any(not s for s in self.stop):
            raise SieveError("generation stop strings must not be empty")
        self.tokenizer = None

    def columns(self) -> list[str]:
        return [self.question_field, self.answer_field,
                *([self.context_field] if self.context_field else [])]

    def metrics(self) -> list[str]:
        return [self.metric] + [m for m in ("exact_match", "f1") if m != self.metric]

    def references(self, example: dict) -> list[str]:
        value = field_value(example, self.answer_field)
        refs = [str(v) for v in value] if isinstance(value, (list, tuple)) else [str(value)]
        return refs or [""]  # no answer: the right output is an empty one

    def render(self, example: dict) -> str:
        fields = {"question": field_text(example, self.question_field)}
        if self.context_field:
            fields["context"] = field_text(example, self.context_field)
        return self.prompt.format(**fields)

    def prompt_fields(self) -> list[str]:
        return [self.question_field, *([self.context_field] if self.context_field else [])]

    def prompt_text(self, example: dict) -> str:
        return self.render(example)

    def collate(self, examples: list[dict], tokenizer, max_length: int,
                labelled: bool = True) -> dict:
        self.tokenizer = tokenizer
        prompts = self.encode(tokenizer, [self.render(e) for e in examples], max_length)
        if not labelled:
            return prompts
        references = [self.references(e) for e in examples]
        sep = "" if self.prompt[-1:].isspace() else " "
        targets = []
        for refs in references:
            text = sep + refs[0].strip() + (self.stop[0] if self.stop else "")
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            if not self.stop and tokenizer.eos_token_id is not None:
                ids = ids + [tokenizer.eos_token_id]
            targets.append(ids[:self.max_new_tokens])
        batch = with_answers(prompts, *pad_tokens(targets, pad_id(tokenizer)))
        batch["references"] = references  # strings: Lightning moves only the tensors
        return batch

    def _stopped(self, text: str) -> bool:
        return any(s in text for s in self.stop)

    def _cut(self, text: str) -> str:
        for s in self.stop:
            text = text.split(s, 1)[0]
        return text.strip()

    def _stop_ids(self) -> set[int]:
        tok = self.tokenizer
        if tok is None:
            raise RuntimeError("generation needs its tokenizer: call check() or collate() first")
        return {tok.eos_token_id} if tok.eos_token_id is not None else set()

    @torch.no_grad()
    def greedy_tokens(self, model, batch: dict) -> list[list[int]]:
        """The greedy continuation of every prompt, up to and including the token that ends it
        (end-of-sequence, or the one that completes a stop string)."""
        tok = self.tokenizer
        return greedy_decode(
            model, prompt_part(batch), self.max_new_tokens, self._stop_ids(),
            (lambda i, ids: self._stopped(tok.decode(ids))) if self.stop else None)

    def answer_text(self, ids) -> str:
        """The answer in generated tokens (``-1``: padding): stop strings and end removed."""
        stop_ids = self._stop_ids()
        return self._cut(self.tokenizer.decode([t for t in ids if t >= 0 and t not in stop_ids],
                                               skip_special_tokens=True))

    @torch.no_grad()
    def generate(self, model, batch: dict) -> list[str]:
        """The greedy answer of every example (stop strings and end-of-sequence removed)."""
        return [self.answer_text(ids) for ids in self.greedy_tokens(model, batch)]

    def answer_logprobs(self, model, batch: dict) -> None:
        """None: a free-text answer has no finite answer set (see ``reference``)."""
        return None

    @torch.no_grad()
    def reference(self, model, batch: dict) -> torch.Tensor:
        """The greedy answer tokens (batch × ``max_new_tokens``, right-padded with -1), up to
        and including the token that ends each answer: what sequence-level distillation
        teaches, and what ``agreement`` decodes."""
        tokens = self.greedy_tokens(model, batch)
        ids = torch.full((len(tokens), self.max_new_tokens), -1, dtype=torch.long)
        for i, row in enumerate(tokens):
            ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        return ids

    @torch.no_grad()
    def agreement(self, model, batch: dict, reference: torch.Tensor) -> torch.Tensor:
        """The primary metric (token F1 or exact match) of the model's greedy answer against
        the reference tokens' answer."""
        measure = token_f1 if self.metric == "f1" else exact_match
        ours = self.generate(model, batch)
        values = [measure(a, self.answer_text(r)) for a, r in zip(ours, reference.tolist())]
        return torch.tensor(values, dtype=torch.float, device=batch["input_ids"].device)

    @torch.no_grad()
    def teacher(self, model, batch: dict) -> torch.Tensor:
        """The greedy answer tokens (``reference``)."""
        return self.reference(model, batch)

    def self_loss(self, model, batch: dict, teacher: torch.Tensor) -> torch.Tensor:
        """Sequence-level distillation: cross-entropy of the teacher's greedy answer tokens
        after the prompt (its stopping token included, so the model learns where to stop)."""
        width = max(1, int((teacher >= 0).sum(1).max()))  # no all-padding columns
        teacher = teacher[:, :width]
        mask = (teacher >= 0).long()
        ids = teacher.masked_fill(mask == 0, pad_id(self.tokenizer))
        device = batch["input_ids"].device
        return answer_loss(model, with_answers(prompt_part(batch), ids.to(device),
                                               mask.to(device)))

    @torch.no_grad()
    def scores(self, model, batch: dict) -> dict[str, torch.Tensor]:
        answers = self.generate(model, batch)
        device = batch["input_ids"].device
        em = [max(exact_match(a, r) for r in refs) for a, refs in zip(answers, batch["references"])]
        f1 = [max(token_f1(a, r) for r in refs) for a, refs in zip(answers, batch["references"])]
        return {"exact_match": torch.tensor(em, dtype=torch.float, device=device),
                "f1": torch.tensor(f1, dtype=torch.float, device=device)}

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Cross-entropy of the reference answer's tokens after the prompt."""
        return answer_loss(model, batch)


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lowercase, drop punctuation and articles, collapse whitespace."""
    text = "".join(c for c in text.lower() if c not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def token_f1(prediction: str, reference: str) -> float:
    """SQuAD token F1 of the normalised answers (1 when both are empty, 0 when one is)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    same = sum((Counter(pred) & Counter(ref)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred), same / len(ref)
    return 2 * precision * recall / (precision + recall)
