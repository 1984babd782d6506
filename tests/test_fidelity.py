"""Task-level answer APIs: answer distributions, references, agreement and the distillation loss,
on labelled and unlabeled (pool) batches of every task kind."""
from __future__ import annotations

import pytest
import torch

from sieve_pl.models.forward import answer_loss, choice_logprobs
from sieve_pl.tasks import Classification, Generation, MultipleChoice
from sieve_pl.tasks.base import answer_kl, option_logliks, stack_rows, with_answers


@pytest.fixture(scope="module")
def model(tiny_llama):
    """The tiny Llama with larger random weights, so its answers differ between inputs."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


@pytest.fixture(scope="module")
def other(model):
    """Another model: the same one with its weights perturbed (answers partly differ)."""
    import copy

    net = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


REVIEWS = [{"text": "A fine film.", "label": "pos"},
           {"text": "The longest two hours of my life, and not in a good way.", "label": "neg"},
           {"text": "Meh.", "label": "mid"}, {"text": "Loved every minute of it", "label": "pos"},
           {"text": "I want my money back", "label": "neg"}]
MEDMCQA = [{"question": "Which vitamin deficiency causes scurvy?", "opa": "Vitamin A",
            "opb": "Vitamin C", "opc": "Vitamin D", "opd": "Vitamin K", "cop": 1},
           {"question": "The largest organ of the body is", "opa": "liver", "opb": "skin",
            "opc": "brain", "opd": "lung", "cop": 1},
           {"question": "Insulin is made in the", "opa": "pancreas", "opb": "kidney",
            "opc": "spleen", "opd": "heart", "cop": 0}]
VARIABLE = [{"q": "Best treatment for anaphylaxis?",
             "choices": ["adrenaline", "oral antihistamine", "reassurance alone"],
             "gold": "adrenaline"},
            {"q": "Normal adult resting heart rate?", "choices": ["60 to 100 per minute", "20"],
             "gold": "20"}]
QA = [{"question": "What is the capital of France?", "answer": "Paris"},
      {"question": "How many legs has a spider?", "answer": "eight"},
      {"question": "Who wrote Hamlet?", "answer": "Shakespeare"}]


def classification(tokenizer, words):
    task = Classification(label_words=words)
    task.check(dataset(REVIEWS), tokenizer)
    return task, REVIEWS


def letters(tokenizer):
    task = MultipleChoice(options_field=["opa", "opb", "opc", "opd"], answer_field="cop")
    task.check(dataset(MEDMCQA), tokenizer)
    return task, MEDMCQA


def loglik(tokenizer):
    task = MultipleChoice(question_field="q", options_field="choices", answer_field="gold",
                          answer_type="text", scoring="loglik")
    task.check(dataset(VARIABLE), tokenizer)
    return task, VARIABLE


KINDS = {
    "classification, one-token words": lambda t: classification(
        t, {"pos": " positive", "neg": " negative", "mid": " neutral"}),
    "classification, multi-token words": lambda t: classification(
        t, {"pos": " positive", "neg": " very negative", "mid": " so-so, I guess"}),
    "multiple choice, letters": letters,
    "multiple choice, loglik, options per row differ": loglik,
}


def unlabeled(rows, task):
    """The rows as a pool holds them: the prompt fields only."""
    from sieve_pl.tasks.pool import prompt_row

    return [prompt_row(task, r) for r in rows]


@pytest.mark.parametrize("kind", KINDS)
def test_answer_distribution_reference_and_agreement(kind, model, other, tokenizer):
    task, rows = KINDS[kind](tokenizer)
    labelled = task.collate(rows, tokenizer, 128)
    prompts = task.collate(unlabeled(rows, task), tokenizer, 128, labelled=False)
    assert "labels" not in prompts and "answer_mask" not in prompts
    with torch.no_grad():
        logp = task.answer_logprobs(model, labelled)
        assert torch.allclose(task.answer_logprobs(model, prompts), logp, atol=1e-5)
    answers = labelled["choice_ids"].shape[1] if "choice_ids" in labelled else 3
    assert logp.shape == (len(rows), answers)
    assert torch.allclose(logp.exp().sum(-1), torch.ones(len(rows)), atol=1e-5)
    # the reference is the predicted answer; a model agrees with itself everywhere
    reference = task.reference(model, prompts)
    assert reference.dtype == torch.long and reference.shape == (len(rows),)
    assert reference.tolist() == task.predict(model, labelled).tolist()
    assert task.agreement(model, prompts, reference).tolist() == [1.0] * len(rows)
    assert task.agreement(model, labelled, reference).tolist() == [1.0] * len(rows)
    # another model agrees where its answer is the same
    theirs = task.reference(other, prompts)
    assert task.agreement(model, prompts, theirs).tolist() == \
        (reference == theirs).float().tolist()
    assert task.agreement(model, prompts, (reference + 1) % 2).tolist() == [0.0] * len(rows)


@pytest.mark.parametrize("kind", KINDS)
def test_self_distillation_loss(kind, model, other, tokenizer):
    task, rows = KINDS[kind](tokenizer)
    prompts = task.collate(unlabeled(rows, task), tokenizer, 128, labelled=False)
    teacher = task.teacher(model, prompts)
    assert task.teacher(model, prompts).equal(teacher)  # deterministic, storable
    with torch.no_grad():
        assert float(task.self_loss(model, prompts, teacher)) == pytest.approx(0, abs=1e-5)
    # towards another model: positive, and a gradient flows to the student
    target = task.teacher(other, prompts)
    model.zero_grad()
    loss = task.self_loss(model, prompts, target)
    loss.backward()
    with torch.no_grad():
        expected = answer_kl(target, task.answer_logprobs(model, prompts)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-4) and expected > 0
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    model.zero_grad()
    # a stored teacher is wider than a batch with fewer options: the extra columns are cut
    wider = torch.nn.functional.pad(target, (0, 2), value=float("-inf"))
    with torch.no_grad():
        assert float(task.self_loss(model, prompts, wider)) == pytest.approx(float(expected),
                                                                             rel=1e-4)


def test_choice_scores_with_gradients_equal_the_shared_cache_path(model, tokenizer):
    task, rows = loglik(tokenizer)
    batch = task.collate(rows, tokenizer, 128, labelled=False)
    with torch.no_grad():
        cached = choice_logprobs(model, batch, batch["choice_ids"], batch["choice_mask"])
    with torch.enable_grad():
        each = option_logliks(model, batch, batch["choice_ids"], batch["choice_mask"])
    assert each.requires_grad
    assert torch.equal(torch.isinf(each), torch.isinf(cached))
    finite = torch.isfinite(cached)
    assert torch.allclose(each[finite], cached[finite], atol=1e-4)


def test_answer_kl_ignores_missing_options():
    teacher = torch.tensor([[0.0, float("-inf")], [-0.1, -2.3]]).log_softmax(-1)
    student = torch.tensor([[0.0, float("-inf")], [-2.3, -0.1]], requires_grad=True)
    kl = answer_kl(teacher, student.log_softmax(-1))
    assert kl[0] == 0 and kl[1] > 0
    kl.sum().backward()
    assert torch.isfinite(student.grad).all()


def test_stack_rows_pads_with_the_missing_value():
    rows = stack_rows([torch.zeros(2, 3), torch.ones(1, 2)])
    assert rows.shape == (3, 3) and rows[2, 2] == float("-inf")
    ids = stack_rows([torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 1, dtype=torch.long)])
    assert ids.tolist() == [[0, 0], [1, -1]]
    assert stack_rows([torch.tensor([1]), torch.tensor([2, 3])]).tolist() == [1, 2, 3]


@pytest.mark.parametrize("metric", ["f1", "exact_match"])
def test_generation_references_are_greedy_tokens(metric, model, other, tokenizer):
    task = Generation(max_new_tokens=5, stop=["\n"], metric=metric)
    task.check(dataset(QA), tokenizer)
    prompts = task.collate(unlabeled(QA, task), tokenizer, 128, labelled=False)
    assert set(prompts) == {"input_ids", "attention_mask", "position_ids"}
    assert task.answer_logprobs(model, prompts) is None  # no finite answer set
    reference = task.reference(model, prompts)
    assert reference.shape == (len(QA), 5) and reference.dtype == torch.long
    assert [task.answer_text(r) for r in reference.tolist()] == task.generate(model, prompts)
    labelled = task.collate(QA, tokenizer, 128)
    assert task.reference(model, labelled).equal(reference)  # the prompt part only
    assert task.agreement(model, prompts, reference).tolist() == [1.0] * len(QA)
    # against another model's answers: its metric of our answer against theirs
    from sieve_pl.tasks.generation import exact_match, token_f1

    theirs = task.reference(other, prompts)
    measure = token_f1 if metric == "f1" else exact_match
    expected = [measure(a, task.answer_text(r)) for a, r in
                zip(task.generate(model, prompts), theirs.tolist())]
    assert task.agreement(model, prompts, theirs).tolist() == pytest.approx(expected)


def test_generation_self_loss_is_the_teachers_answer_tokens(model, other, tokenizer):
    task = Generation(max_new_tokens=5, stop=["\n"])
    task.check(dataset(QA), tokenizer)
    prompts = task.collate(unlabeled(QA, task), tokenizer, 128, labelled=False)
    teacher = task.teacher(other, prompts)
    loss = task.self_loss(model, prompts, teacher)
    mask = (teacher >= 0).long()
    width = int(mask.sum(1).max())
    ids = teacher.clamp(min=0)[:, :width].masked_fill(mask[:, :width] == 0, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = answer_loss(model, with_answers(prompts, ids, mask[:, :width]))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.zero_grad()


def test_rows_without_prompt_text_are_not_usable(tokenizer):
    task, _ = classification(tokenizer, {"pos": " positive", "neg": " negative",
                                         "mid": " neutral"})
    assert task.has_prompt({"text": "fine"})
    assert not task.has_prompt({"text": ""}) and not task.has_prompt({"text": None})
    assert not task.has_prompt({"text": "  \n"}) and not task.has_prompt({"other": "x"})
    mc, _ = loglik(tokenizer)
    assert mc.has_prompt({"q": "Why?", "choices": ["a", "b"]})
    assert not mc.has_prompt({"q": "Why?", "choices": ["a"]})  # fewer than two options
    assert not mc.has_prompt({"q": "Why?", "choices": []})
