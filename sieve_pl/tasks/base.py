"""What every task kind provides, and the scoring helpers the kinds share.

A task turns dataset rows into batches (``collate``) and scores a model on a batch (``scores``).
The rest of the pipeline never asks which kind it holds:

* calibration and refit run the model's forward on ``input_ids`` / ``attention_mask`` /
  ``position_ids`` of a batch: the tokens whose activations describe the task (the prompt, plus
  the reference answer for tasks whose answers are longer than one token);
* the search, evaluation and recovery's validation read per-example scores in [0, 1] of the
  task's primary metric (``score``), averaged into one number (accuracy, exact match or F1);
* recovery minimises ``loss`` (cross-entropy on the answer tokens only; the prompt is masked).
"""
from __future__ import annotations

import torch

from ..errors import SieveError


class Task:
    """A task kind. Subclasses turn examples into prompts and model outputs into scores."""

    settings: tuple[str, ...] = ()
    metric: str = "accuracy"  # the primary metric: what the search keeps within epsilon

    def config(self) -> dict:
        """The settings that define the task (for stage fingerprints)."""
        return {"kind": type(self).__name__,
                **{k: v for k, v in vars(self).items() if k in self.settings}}

    def columns(self) -> list[str]:
        """Dataset fields this task reads (column names; ``a.b`` is field ``b`` of column ``a``)."""
        raise NotImplementedError

    def check(self, dataset, tokenizer) -> None:
        """Fail with one clear line on a missing column or unusable setting; keep the tokenizer."""
        self.tokenizer = tokenizer
        missing = [c for c in dict.fromkeys(column_of(f, dataset.column_names)
                                            for f in self.columns())
                   if c not in dataset.column_names]
        if missing:
            raise SieveError(f"dataset has no column {', '.join(map(repr, missing))}; "
                             f"columns: {', '.join(dataset.column_names)}")

    def metrics(self) -> list[str]:
        """Names of the metrics ``scores`` returns, the primary one first."""
        return [self.metric]

    def collate(self, examples: list[dict], tokenizer, max_length: int) -> dict:
        """A batch: ``input_ids`` / ``attention_mask`` / ``position_ids`` (left-padded) plus
        whatever the task needs to score it."""
        raise NotImplementedError

    @torch.no_grad()
    def scores(self, model, batch: dict) -> dict[str, torch.Tensor]:
        """Per-example values in [0, 1] of every metric in ``metrics()`` (float tensors)."""
        raise NotImplementedError

    def score(self, model, batch: dict) -> torch.Tensor:
        """Per-example values of the primary metric (1 = right, 0 = wrong; F1 in between)."""
        return self.scores(model, batch)[self.metric]

    def loss(self, model, batch: dict) -> torch.Tensor:
        """Training loss on the answer tokens only (recovery)."""
        raise NotImplementedError

    def confidence(self, model, batch: dict) -> torch.Tensor:
        """Per example, how safely the model gets it right (higher: safer; any monotone measure).
        The search scores the least safe examples first, where pruned candidates fail first.
        Default: the primary score."""
        return self.score(model, batch).float()


# --- fields ------------------------------------------------------------------------------------

def column_of(field: str, columns) -> str:
    """The dataset column a field path reads: ``answers.text`` reads column ``answers``."""
    return field if field in columns else field.split(".")[0]


def field_value(example: dict, field: str):
    """A field of a row; dots walk into nested dicts (``answers.text``, ``context.contexts``)."""
    if field in example:
        return example[field]
    value = example
    for part in field.split("."):
        if not isinstance(value, dict) or part not in value:
            raise SieveError(f"row has no field {field!r}; fields: {', '.join(example)}")
        value = value[part]
    return value


def field_text(example: dict, field: str) -> str:
    """A field as prompt text: lists (several retrieved passages, say) are joined by newlines."""
    value = field_value(example, field)
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return str(value)


# --- batches -----------------------------------------------------------------------------------

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


def pad_tokens(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their mask; at least one column wide."""
    width = max(1, max((len(s) for s in sequences), default=1))
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def with_answers(prompts: dict, ids: torch.Tensor, mask: torch.Tensor) -> dict:
    """Prompt then answer tokens in one sequence: ``[left padding | prompt | answer | padding]``.

    ``ids`` / ``mask`` are the right-padded answer tokens (``pad_tokens``); ``answer_mask``
    marks them in the result, and the prompt is its first ``input_ids.shape[1] -
    answer_mask.shape[1]`` columns (``prompt_part``).
    """
    joined = torch.cat([prompts["attention_mask"], mask], 1)
    return {"input_ids": torch.cat([prompts["input_ids"], ids], 1), "attention_mask": joined,
            "position_ids": (joined.cumsum(-1) - 1).clamp(min=0), "answer_mask": mask}


def prompt_part(batch: dict) -> dict:
    """The prompt columns of a ``with_answers`` batch (what the model sees before answering)."""
    width = batch["input_ids"].shape[1] - batch["answer_mask"].shape[1]
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask", "position_ids")}


# --- scoring -----------------------------------------------------------------------------------

def margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Score of the right answer minus the best wrong one's, per row (< 0: answered wrong)."""
    rows = torch.arange(len(labels), device=labels.device)
    right = scores[rows, labels]
    wrong = scores.clone()
    wrong[rows, labels] = float("-inf")
    return (right - wrong.max(-1).values).float()
