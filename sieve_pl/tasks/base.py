"""What every task kind provides, and the scoring helpers the kinds share.

A task turns dataset rows into batches (``collate``) and scores a model on a batch (``scores``).
The rest of the pipeline never asks which kind it holds:

* calibration and refit run the model's forward on ``input_ids`` / ``attention_mask`` /
  ``position_ids`` of a batch: the tokens whose activations describe the task (the prompt, plus
  the reference answer for tasks whose answers are longer than one token);
* the search, evaluation and recovery's validation read per-example scores in [0, 1] of the
  task's primary metric (``score``), averaged into one number (accuracy, exact match or F1);
* recovery minimises ``loss`` (cross-entropy on the answer tokens only; the prompt is masked)
  and, distilling, ``self_loss`` towards the dense model's ``teacher`` outputs.

Fidelity to the dense model needs no labels, so it works on unlabeled prompts too
(``collate(..., labelled=False)``: the data pools of ``data.pool``): ``answer_logprobs`` is the
model's log-distribution over the task's answers, ``reference`` its own answers in a storable
form, ``agreement`` whether another model gives the same answers (1) or not (0; token F1 for
generation), ``teacher`` / ``self_loss`` what recovery's distillation stores and minimises.
"""
from __future__ import annotations

import string

import torch

from ..errors import SieveError
from ..models.forward import answer_logprobs as answer_token_logprobs
from ..models.forward import choice_logprobs


class Task:
    """A task kind. Subclasses turn examples into prompts and model outputs into scores."""

    settings: tuple[str, ...] = ()
    metric: str = "accuracy"  # the primary metric: what the search keeps within epsilon
    chat_template: bool = False  # set from ``data.chat_template`` (TaskDataModule.prepare)

    def config(self) -> dict:
        """The settings that define the task (for stage fingerprints)."""
        return {"kind": type(self).__name__,
                **{k: v for k, v in vars(self).items() if k in self.settings},
                **({"chat_template": True} if self.chat_template else {})}

    def chat(self, tokenizer, prompt: str) -> str:
        """``prompt`` as the model sees it: a user turn through the tokenizer's chat template
        with the assistant's turn opened (the answer follows it), when ``chat_template``."""
        if not self.chat_template:
            return prompt
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                             tokenize=False, add_generation_prompt=True)

    def encode(self, tokenizer, prompts: list[str], max_length: int) -> dict:
        """Left-padded prompts (:func:`encode_prompts`), through the chat template when on (its
        text already holds the special tokens the model expects: none are added)."""
        return encode_prompts(tokenizer, [self.chat(tokenizer, p) for p in prompts], max_length,
                              add_special_tokens=not self.chat_template)

    def columns(self) -> list[str]:
        """Dataset fields this task reads (column names; ``a.b`` is field ``b`` of column ``a``)."""
        raise NotImplementedError

    def check(self, dataset, tokenizer) -> None:
        """Fail with one clear line on a missing column or unusable setting; keep the tokenizer."""
        self.tokenizer = tokenizer
        require_columns(dataset, self.columns(), "dataset")

    def metrics(self) -> list[str]:
        """Names of the metrics ``scores`` returns, the primary one first."""
        return [self.metric]

    def prompt_fields(self) -> list[str]:
        """The fields the prompt reads (an unlabeled row needs only these)."""
        raise NotImplementedError

    def prompt_text(self, example: dict) -> str:
        """The prompt the model sees for a row (its answer options included)."""
        raise NotImplementedError

    def has_prompt(self, example: dict) -> bool:
        """Whether a row can be prompted: every prompt field present and not empty (unlabeled
        pools skip the rows that cannot)."""
        for field in self.prompt_fields():
            try:
                value = field_value(example, field)
            except SieveError:
                return False
            if value is None or (isinstance(value, (list, tuple)) and not value) or \
                    not str(value).strip():
                return False
        try:
            self.prompt_text(example)
        except SieveError:  # e.g. an options list with fewer than two options
            return False
        return True

    def check_prompts(self, dataset, what: str) -> None:
        """Fail with one line when an unlabeled source lacks a prompt column."""
        require_columns(dataset, self.prompt_fields(), what)

    def collate(self, examples: list[dict], tokenizer, max_length: int,
                labelled: bool = True) -> dict:
        """A batch: ``input_ids`` / ``attention_mask`` / ``position_ids`` (left-padded) plus
        whatever the task needs to score it. ``labelled=False``: the prompts only (and the
        answer options), without reading the label or answer column: enough for
        ``answer_logprobs``, ``reference``, ``agreement``, ``teacher`` and ``self_loss``."""
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

    @torch.no_grad()
    def graded(self, model, batch: dict) -> torch.Tensor:
        """``score`` and ``confidence`` per example (batch × 2); kinds that read both off one
        forward (the answer scores) override it."""
        return torch.stack([self.score(model, batch).float(),
                            self.confidence(model, batch).float()], 1)

    # --- fidelity to another model's answers (labels not needed) ----------------------------
    # Defaults for kinds with a finite answer set (classification, multiple choice); generation
    # overrides them with greedy answers.

    def answer_logprobs(self, model, batch: dict) -> torch.Tensor | None:
        """The model's log-distribution over the task's answers (batch × answers, each row a
        log-softmax; ``-inf`` for options a row lacks), differentiable. None: no finite answer
        set (generation)."""
        raise NotImplementedError

    @torch.no_grad()
    def reference(self, model, batch: dict) -> torch.Tensor:
        """The model's own answers, storable (safetensors, or ``.tolist()`` for JSON): here the
        index of the answer it picks (batch,)."""
        return self.answer_logprobs(model, batch).argmax(-1)

    @torch.no_grad()
    def agreement(self, model, batch: dict, reference: torch.Tensor) -> torch.Tensor:
        """Per example in [0, 1]: 1 where the model's answer is ``reference``'s (another
        model's ``reference`` on the same batch)."""
        ours = self.reference(model, batch)
        return (ours == reference.to(ours.device)).float()

    @torch.no_grad()
    def teacher(self, model, batch: dict) -> torch.Tensor:
        """What distilling towards this model needs of it, per example (``self_loss``'s
        ``teacher``): here its answer log-distribution (batch × answers)."""
        return self.answer_logprobs(model, batch)

    def self_loss(self, model, batch: dict, teacher: torch.Tensor) -> torch.Tensor:
        """Distillation loss towards ``teacher`` (another model's ``teacher`` outputs on these
        prompts; wider rows are cut to this batch's answers): here the mean over examples of
        KL(teacher ‖ model) over the answer set."""
        student = self.answer_logprobs(model, batch)
        return answer_kl(teacher[:, :student.shape[1]].to(student.device), student).mean()


# --- fields ------------------------------------------------------------------------------------

def require_columns(dataset, fields: list[str], what: str) -> None:
    """One line naming the columns ``fields`` read that ``dataset`` lacks, and those it has."""
    missing = [c for c in dict.fromkeys(column_of(f, dataset.column_names) for f in fields)
               if c not in dataset.column_names]
    if missing:
        raise SieveError(f"{what} has no column {', '.join(map(repr, missing))}; "
                         f"columns: {', '.join(dataset.column_names)}")


def require_scalar(dataset, field: str, what: str) -> None:
    """One line for a label column that holds lists or records (a parquet's list column, say):
    a label is one value per row, and Arrow's ``unique`` has no kernel for the others."""
    from datasets import ClassLabel, Value

    feature = (dataset.features or {}).get(field)
    if feature is not None and not isinstance(feature, (Value, ClassLabel)):
        raise SieveError(f"{what} column {field!r} holds {type(feature).__name__.lower()} values "
                         f"({feature}); it needs one label per row (a string or a number)")


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


def check_template(template: str, names: set[str], kind: str) -> None:
    """Fail with one line on a placeholder the task does not fill (``{oops}``) or a stray brace,
    which ``str.format`` would otherwise raise on the first batch, after the model has loaded."""
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as err:
        raise SieveError(f"{kind} prompt {template!r} is not a valid template ({err}); write a "
                         f"literal brace as '{{{{' or '}}}}'") from None
    unknown = sorted(used - names)
    if unknown:
        raise SieveError(f"{kind} prompt has unknown placeholder(s) "
                         f"{', '.join('{' + n + '}' for n in unknown)}; it can use "
                         f"{', '.join('{' + n + '}' for n in sorted(names))} (the columns they "
                         f"read are the task's *_field settings)")


def field_text(example: dict, field: str) -> str:
    """A field as prompt text: lists (several retrieved passages, say) are joined by newlines."""
    value = field_value(example, field)
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    return str(value)


# --- batches -----------------------------------------------------------------------------------

def encode_prompts(tokenizer, prompts: list[str], max_length: int,
                   add_special_tokens: bool = True) -> dict:
    """Left-padded prompts with position ids that ignore the padding.

    Left padding puts every prompt's next token at the last position, so only that position's
    logits are computed; explicit position ids make the result independent of the padding.
    The tokenizer comes set that way from loading (``sieve_pl.models.loading.left_padded``).
    """
    if (tokenizer.padding_side, tokenizer.truncation_side) != ("left", "left"):
        raise SieveError(
            f"prompts are encoded padded and truncated on the left, but this tokenizer pads on "
            f"the {tokenizer.padding_side} and truncates on the {tokenizer.truncation_side}: "
            "load it with sieve_pl.models.loading.load_tokenizer, or pass it through "
            "left_padded(tokenizer)")
    enc = tokenizer(prompts, return_tensors="pt", padding=True, truncation=True,
                    max_length=max_length, add_special_tokens=add_special_tokens)
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
    """The prompt columns of a ``with_answers`` batch (what the model sees before answering);
    a batch without answers (``labelled=False``) is all prompt."""
    width = batch["input_ids"].shape[1] - (batch["answer_mask"].shape[1]
                                           if "answer_mask" in batch else 0)
    return {k: batch[k][:, :width] for k in ("input_ids", "attention_mask", "position_ids")}


# --- scoring -----------------------------------------------------------------------------------

def option_logliks(model, prompts: dict, choice_ids: torch.Tensor,
                   choice_mask: torch.Tensor) -> torch.Tensor:
    """``choice_logprobs`` (batch × choices), also where gradients flow: its shared prompt cache
    cannot be copied inside an autograd graph, so with gradients on and choices longer than one
    token each choice runs as its own prompt + choice sequence (one forward per choice)."""
    if not torch.is_grad_enabled() or choice_ids.shape[2] == 1:
        return choice_logprobs(model, prompts, choice_ids, choice_mask)
    columns = []
    for k in range(choice_ids.shape[1]):
        logp = answer_token_logprobs(model, with_answers(prompts, choice_ids[:, k],
                                                         choice_mask[:, k])).sum(1)
        columns.append(logp.masked_fill(choice_mask[:, k, 0] == 0, float("-inf")))
    return torch.stack(columns, 1)


def answer_kl(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Per row, KL(teacher ‖ student) of two answer log-distributions (batch × answers);
    answers the teacher gives no mass (a row's missing options, ``-inf``) add nothing."""
    teacher, student = teacher.float(), student.float()
    mass = teacher.exp()
    terms = torch.where(mass > 0, mass * (teacher - student), torch.zeros_like(mass))
    return terms.sum(-1)


def stack_rows(chunks: list[torch.Tensor], fill=None) -> torch.Tensor:
    """Per-batch outputs (rows × columns) as one tensor; narrower ones padded with ``fill``
    (a pool's batches list different numbers of options). None: ``-inf`` for floats (a missing
    option's log-probability), -1 for integers (no token)."""
    if not chunks:
        return torch.empty(0)
    if chunks[0].dim() < 2:
        return torch.cat(chunks)
    if fill is None:
        fill = float("-inf") if chunks[0].is_floating_point() else -1
    width = max(c.shape[1] for c in chunks)
    return torch.cat([torch.nn.functional.pad(c, (0, width - c.shape[1]), value=fill)
                      for c in chunks])


def graded(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Accuracy (the answer picked is the right one) and ``margin`` per row (batch × 2) from
    one set of answer scores."""
    right = (scores.argmax(-1) == labels).float()
    return torch.stack([right, margin(scores, labels)], 1)


def margin(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Score of the right answer minus the best wrong one's, per row (< 0: answered wrong)."""
    rows = torch.arange(len(labels), device=labels.device)
    right = scores[rows, labels]
    wrong = scores.clone()
    wrong[rows, labels] = float("-inf")
    return (right - wrong.max(-1).values).float()
