"""Forward helpers every stage and task kind runs the model through: next-token logits at the
last position, answer-token log-probabilities, choice log-likelihoods on a shared prompt cache,
greedy decoding. Model-side (they know transformers' calling convention, not any task), so
stages import them from here rather than from the task kinds.
"""
from __future__ import annotations

import copy
import functools

import torch
import torch.nn.functional as F


@functools.cache
def cache_name() -> str:
    """The key/value cache's keyword and output field: ``cache`` from transformers 5.2x on,
    ``past_key_values`` before."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    return "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"


def last_logits(model, batch: dict) -> torch.Tensor:
    """Next-token logits at the last position only (``logits_to_keep=1``)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=1, use_cache=False)
    return out.logits[:, -1]


def answer_logprobs(model, batch: dict) -> torch.Tensor:
    """Log-probability of every answer token of a ``with_answers`` batch given all before it
    (batch × answer width; 0 at padding). One forward; logits only at the answer positions."""
    mask = batch["answer_mask"]
    width = mask.shape[1]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], logits_to_keep=width + 1, use_cache=False)
    logits = out.logits[:, :-1].float()  # position t predicts token t + 1
    targets = batch["input_ids"][:, -width:]
    nll = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none")
    return -nll.view_as(targets) * mask


def answer_loss(model, batch: dict) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens of a ``with_answers`` batch (prompt masked)."""
    return -answer_logprobs(model, batch).sum() / batch["answer_mask"].sum().clamp(min=1)


def choice_logprobs(model, prompts: dict, choice_ids: torch.Tensor,
                    choice_mask: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood of each choice's tokens after its prompt (batch × choices).

    ``choice_ids`` / ``choice_mask`` are batch × choices × tokens, right-padded; a choice with
    no tokens (a row with fewer options) scores ``-inf``. When every choice is one token this
    is one forward with ``logits_to_keep=1``. Otherwise the prompt runs once and each choice's
    remaining tokens run on a copy of its key/value cache (the prompt is shared, not repeated).
    """
    out = model(input_ids=prompts["input_ids"], attention_mask=prompts["attention_mask"],
                position_ids=prompts["position_ids"], logits_to_keep=1,
                use_cache=choice_ids.shape[2] > 1)
    first = out.logits[:, -1].float().log_softmax(-1)
    total = first.gather(1, choice_ids[:, :, 0]) * choice_mask[:, :, 0]
    longer = [k for k in range(choice_ids.shape[1]) if choice_mask[:, k, 1:].any()]
    start = prompts["position_ids"][:, -1:] + 1
    for i, k in enumerate(longer):
        ids, mask = choice_ids[:, k], choice_mask[:, k]
        cache = getattr(out, cache_name())
        rest = model(input_ids=ids[:, :-1],
                     attention_mask=torch.cat([prompts["attention_mask"], mask[:, :-1]], 1),
                     position_ids=start + torch.arange(ids.shape[1] - 1, device=ids.device),
                     use_cache=True,  # on a copy of the prompt's cache, except for the last
                     **{cache_name(): cache if i == len(longer) - 1 else copy.deepcopy(cache)})
        logp = rest.logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        total[:, k] += (logp * mask[:, 1:]).sum(1)
    return total.masked_fill(choice_mask[:, :, 0] == 0, float("-inf"))


@torch.no_grad()
def greedy_decode(model, prompts: dict, max_new_tokens: int, stop_ids: set[int],
                  finished=None) -> list[list[int]]:
    """Greedy continuation of left-padded prompts with a key/value cache.

    A row stops at a token in ``stop_ids`` (kept) or when ``finished(row, tokens)`` says so;
    decoding ends when every row stopped or after ``max_new_tokens`` tokens.
    """
    mask, position = prompts["attention_mask"], prompts["position_ids"][:, -1:]
    out = model(input_ids=prompts["input_ids"], attention_mask=mask,
                position_ids=prompts["position_ids"], logits_to_keep=1, use_cache=True)
    rows = mask.shape[0]
    tokens: list[list[int]] = [[] for _ in range(rows)]
    done = [False] * rows
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                tokens[i].append(t)
                done[i] = t in stop_ids or bool(finished and finished(i, tokens[i]))
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        position = position + 1
        out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=position,
                    logits_to_keep=1, use_cache=True, **{cache_name(): getattr(out, cache_name())})
    return tokens
