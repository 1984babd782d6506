"""Multiple choice: a question (and optional context) with options; the model picks one."""
from __future__ import annotations

from typing import Literal

import torch

from ..errors import SieveError
from ..models.forward import answer_loss
from .base import (Task, check_template, encode_prompts, field_text, field_value, graded, margin,
                   option_logliks, pad_id, pad_tokens, prompt_part, require_scalar,
                   with_answers)
from .classification import label_word_tokens


class MultipleChoice(Task):
    """A question with options (medical QA: MedMCQA A–D, PubMedQA yes/no/maybe); accuracy.

    Where the options are (pick one):

    * ``options_field: options`` — one column holding each row's list of options;
    * ``options_field: [opa, opb, opc, opd]`` — several columns, one option each (MedMCQA);
    * ``fixed_options: [yes, no, maybe]`` — the same options for every row (PubMedQA); then
      ``options_field`` is not read.

    The right answer is in ``answer_field``, given as ``answer_type``: ``index`` (0-based
    position in the options, MedMCQA's ``cop``), ``letter`` (``A``, ``B``, …) or ``text`` (the
    option itself, PubMedQA's ``final_decision``).

    Scoring: ``letter`` lists the options in the prompt as ``A. …`` and picks the letter whose
    token (``" A"``, ``" B"``, …) is most likely next: one forward, last-position logits only.
    ``loglik`` scores every option's own text by its summed log-likelihood after the prompt
    (the prompt runs once; the options need not be listed in it). Calibration sees the prompt
    followed by the right answer (its letter or text), and recovery's loss is the cross-entropy
    of those answer tokens (the prompt is not a target). Fidelity and distillation read the
    options' scores renormalised over the options (``answer_logprobs``).

    Args:
        question_field: column holding the question.
        options_field: one column with a list of options, or a list of columns with one each.
        answer_field: column holding the right answer.
        answer_type: how ``answer_field`` names the answer: ``index``, ``letter`` or ``text``.
        context_field: optional column with context inserted at ``{context}`` (an abstract,
            retrieved passages; a list is joined by newlines; ``a.b`` reads field ``b`` of a
            column ``a`` of records, e.g. PubMedQA's ``context.contexts``).
        fixed_options: the same options for every example, instead of ``options_field``.
        scoring: ``letter`` (next-token logits of the option letters) or ``loglik`` (summed
            log-likelihood of each option's text).
        length_normalize: ``loglik`` only: average the option's token log-likelihoods instead
            of summing them (less bias towards short options).
        prompt: template with ``{question}``, ``{options}`` (the lettered list, one per line;
            required by ``letter`` scoring) and ``{context}`` (required with ``context_field``).
            Left empty, a plain ``Context: … Question: … A. … Answer:`` template that fits the
            other settings is used.
        letters: labels of the options, in order (at least as many as the longest option list).
    """

    settings = ("question_field", "options_field", "answer_field", "answer_type",
                "context_field", "fixed_options", "scoring", "length_normalize", "prompt",
                "letters")

    def __init__(
        self,
        question_field: str = "question",
        options_field: str | list[str] = "options",
        answer_field: str = "answer",
        answer_type: Literal["index", "letter", "text"] = "index",
        context_field: str | None = None,
        fixed_options: list[str] | None = None,
        scoring: Literal["letter", "loglik"] = "letter",
        length_normalize: bool = False,
        prompt: str | None = None,
        letters: str = "ABCDEFGHIJ",
    ):
        self.question_field, self.options_field = question_field, options_field
        self.answer_field, self.answer_type = answer_field, answer_type
        self.context_field, self.fixed_options = context_field, fixed_options
        self.scoring, self.length_normalize, self.letters = scoring, length_normalize, letters
        if answer_type not in ("index", "letter", "text"):
            raise SieveError(f"answer_type must be index, letter or text, got {answer_type!r}")
        if scoring not in ("letter", "loglik"):
            raise SieveError(f"scoring must be letter or loglik, got {scoring!r}")
        if prompt is None:
            prompt = ("Context: {context}\n" if context_field else "") + "Question: {question}\n"
            prompt += ("{options}" if scoring == "letter" else "") + "Answer:"
        self.prompt = prompt
        if "{question}" not in prompt:
            raise SieveError("multiple_choice prompt must contain '{question}'")
        check_template(prompt, {"question", "options", "context"}, "multiple_choice")
        if scoring == "letter" and "{options}" not in prompt:
            raise SieveError("multiple_choice with letter scoring needs '{options}' in the prompt")
        if bool(context_field) != ("{context}" in prompt):
            raise SieveError("multiple_choice prompt must contain '{context}' exactly when "
                             "context_field is set")
        if fixed_options is not None and len(fixed_options) < 2:
            raise SieveError("fixed_options needs at least two options")
        if isinstance(options_field, list) and len(options_field) < 2 and fixed_options is None:
            raise SieveError("options_field needs a list column or at least two columns")
        self.letter_tokens: list[list[int]] | None = None

    def columns(self) -> list[str]:
        return [*self.prompt_fields(), self.answer_field]

    def prompt_fields(self) -> list[str]:
        options = ([] if self.fixed_options is not None else
                   self.options_field if isinstance(self.options_field, list)
                   else [self.options_field])
        return [self.question_field, *options,
                *([self.context_field] if self.context_field else [])]

    def prompt_text(self, example: dict) -> str:
        return self.render(example, self.options(example))

    def _max_options(self) -> int | None:
        if self.fixed_options is not None:
            return len(self.fixed_options)
        return len(self.options_field) if isinstance(self.options_field, list) else None

    def check(self, dataset, tokenizer) -> None:
        super().check(dataset, tokenizer)
        require_scalar(dataset, self.answer_field, "answer")
        most = self._max_options()
        if most is not None and most > len(self.letters):
            raise SieveError(f"{most} options but only {len(self.letters)} letters "
                             f"({self.letters!r})")
        values = dataset.unique(self.answer_field) if self.answer_type != "text" or \
            self.fixed_options is not None else []
        if self.answer_type == "index":
            bad = [v for v in values if not isinstance(v, int) or v < 0
                   or (most is not None and v >= most)]
            valid = f"0..{most - 1}" if most else "0, 1, …"
        elif self.answer_type == "letter":
            allowed = self.letters[:most] if most else self.letters
            bad = [v for v in values if str(v).strip().upper() not in allowed or not str(v).strip()]
            valid = ", ".join(allowed)
        else:
            bad = [v for v in values if str(v) not in self.fixed_options]
            valid = ", ".join(map(str, self.fixed_options or []))
        if bad:
            kind = {"index": "indices", "letter": "letters", "text": "texts"}[self.answer_type]
            raise SieveError(f"answer values {sorted(map(str, bad))[:5]} of column "
                             f"{self.answer_field!r} are not option {kind} ({valid})")
        self.letter_tokens = label_word_tokens(
            tokenizer, {c: self._sep() + c for c in self.letters})

    def _sep(self) -> str:
        """Between the prompt and an answer: a space unless the prompt ends in whitespace."""
        return "" if self.prompt[-1:].isspace() else " "

    def options(self, example: dict) -> list[str]:
        if self.fixed_options is not None:
            return [str(o) for o in self.fixed_options]
        if isinstance(self.options_field, list):
            return [str(field_value(example, f)) for f in self.options_field]
        value = field_value(example, self.options_field)
        if not isinstance(value, (list, tuple)) or len(value) < 2:
            raise SieveError(f"options column {self.options_field!r} must hold a list of two or "
                             f"more options, got {value!r}")
        return [str(o) for o in value]

    def answer_index(self, example: dict, options: list[str]) -> int:
        value = field_value(example, self.answer_field)
        if self.answer_type == "index":
            index = int(value)
        elif self.answer_type == "letter":
            index = self.letters.find(str(value).strip().upper())
        else:
            index = options.index(str(value)) if str(value) in options else -1
        if not 0 <= index < len(options):
            raise SieveError(f"answer {value!r} ({self.answer_type}) is not one of the options "
                             f"{options} of question {field_text(example, self.question_field)!r}")
        return index

    def render(self, example: dict, options: list[str]) -> str:
        if len(options) > len(self.letters):
            raise SieveError(f"{len(options)} options but only {len(self.letters)} letters")
        listed = "".join(f"{self.letters[i]}. {o}\n" for i, o in enumerate(options))
        fields = {"question": field_text(example, self.question_field), "options": listed}
        if self.context_field:
            fields["context"] = field_text(example, self.context_field)
        return self.prompt.format(**fields)

    def collate(self, examples: list[dict], tokenizer, max_length: int,
                labelled: bool = True) -> dict:
        if self.letter_tokens is None:
            self.letter_tokens = label_word_tokens(
                tokenizer, {c: self._sep() + c for c in self.letters})
        options = [self.options(e) for e in examples]
        prompts = self.encode(tokenizer, [self.render(e, o) for e, o in zip(examples, options)],
                              max_length)
        if self.scoring == "letter":
            choices = [self.letter_tokens[:len(o)] for o in options]
        else:
            choices = [[tokenizer(self._sep() + o, add_special_tokens=False)["input_ids"]
                        for o in opts] for opts in options]
        pad = pad_id(tokenizer)
        batch = prompts
        if labelled:  # the right answer follows the prompt (calibration sees it, loss reads it)
            labels = [self.answer_index(e, o) for e, o in zip(examples, options)]
            answer_ids, answer_mask = pad_tokens([c[i] for c, i in zip(choices, labels)], pad)
            batch = with_answers(prompts, answer_ids, answer_mask)
            batch["labels"] = torch.tensor(labels)
        width = max(len(t) for c in choices for t in c)
        most = max(len(c) for c in choices)
        batch["choice_ids"] = torch.full((len(examples), most, width), pad, dtype=torch.long)
        batch["choice_mask"] = torch.zeros((len(examples), most, width), dtype=torch.long)
        for i, c in enumerate(choices):
            ids, mask = pad_tokens(c, pad)
            batch["choice_ids"][i, :len(c), :ids.shape[1]] = ids
            batch["choice_mask"][i, :len(c), :ids.shape[1]] = mask
        return batch

    @torch.no_grad()
    def option_scores(self, model, batch: dict) -> torch.Tensor:
        """Log-likelihood of each option (batch × options; ``-inf`` where a row has fewer)."""
        return self._option_scores(model, batch)

    def _option_scores(self, model, batch: dict) -> torch.Tensor:
        scores = option_logliks(model, prompt_part(batch), batch["choice_ids"],
                                batch["choice_mask"])
        if self.length_normalize and self.scoring == "loglik":
            scores = scores / batch["choice_mask"].sum(-1).clamp(min=1)
        return scores

    def answer_logprobs(self, model, batch: dict) -> torch.Tensor:
        """The options' scores (letters or texts, as ``scoring`` says) renormalised over the
        options: log-softmax, ``-inf`` where a row has fewer options."""
        return self._option_scores(model, batch).log_softmax(-1)

    @torch.no_grad()
    def predict(self, model, batch: dict) -> torch.Tensor:
        """The predicted option index of every example."""
        return self.option_scores(model, batch).argmax(-1)

    @torch.no_grad()
    def scores(self, model, batch: dict) -> dict[str, torch.Tensor]:
        return {"accuracy": (self.predict(model, batch) == batch["labels"]).float()}

    @torch.no_grad()
    def confidence(self, model, batch: dict) -> torch.Tensor:
        """Log-likelihood margin of the right option over the best wrong one."""
        return margin(self.option_scores(model, batch), batch["labels"])

    @torch.no_grad()
    def graded(self, model, batch: dict) -> torch.Tensor:
        return graded(self.option_scores(model, batch), batch["labels"])

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Cross-entropy of the right answer's tokens (letter or text) after the prompt."""
        return answer_loss(model, batch)
