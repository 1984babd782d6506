"""Task kinds and data sources: scoring equals brute force, losses mask the prompt, fields map."""
from __future__ import annotations

import copy
import csv
import json

import lightning as L
import pytest
import torch

from sieve_pl.errors import SieveError
from sieve_pl.models.module import SieveLM, evaluate, evaluate_metrics
from sieve_pl.stages.search import Fitness
from sieve_pl.tasks import (Classification, Generation, MultipleChoice, SplitSizes,
                            TaskDataModule)
from sieve_pl.models.forward import answer_logprobs, greedy_decode
from sieve_pl.tasks.base import prompt_part
from sieve_pl.tasks.generation import exact_match, normalize_answer, token_f1
from sieve_pl.tasks.sources import load_source


@pytest.fixture(scope="module")
def model(tiny_llama):
    """The tiny Llama with larger random weights, so its predictions differ between inputs."""
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return net


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def dataset(rows):
    from datasets import Dataset

    return Dataset.from_list(rows)


def logprob(model, tokenizer, prompt: str, continuation: list[int]) -> float:
    """Brute force: one full forward over prompt + continuation, no padding, no cache."""
    ids = tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([ids + continuation])).logits[0].float().log_softmax(-1)
    return float(sum(logp[len(ids) - 1 + j, t] for j, t in enumerate(continuation)))


def tokens(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


# --- classification ----------------------------------------------------------------------------

WORDS = {"pos": " positive", "neg": " very negative", "mid": " so-so, I guess"}
REVIEWS = [{"text": "A fine film.", "label": "pos"},
           {"text": "The longest two hours of my life, and not in a good way.", "label": "neg"},
           {"text": "Meh.", "label": "mid"}, {"text": "Loved every minute of it", "label": "pos"}]


def test_multi_token_label_words_score_by_summed_loglikelihood(model, tokenizer):
    task = Classification(label_words=WORDS)
    task.check(dataset(REVIEWS), tokenizer)
    assert not task.single_token and task.num_classes() == 3
    batch = task.collate(REVIEWS, tokenizer, 64)
    with torch.inference_mode():  # as the search scores
        got = task.class_scores(model, batch)
    expected = torch.tensor([[logprob(model, tokenizer, task.prompt.format(text=r["text"]),
                                      tokens(tokenizer, w)) for w in WORDS.values()]
                             for r in REVIEWS])
    assert torch.allclose(got, expected, atol=1e-4)
    hits = task.scores(model, batch)["accuracy"]
    assert hits.tolist() == (expected.argmax(-1) == batch["labels"]).float().tolist()

    # loss: cross-entropy of the right label's tokens only, averaged over those tokens
    words = [tokens(tokenizer, WORDS[r["label"]]) for r in REVIEWS]
    total = sum(logprob(model, tokenizer, task.prompt.format(text=r["text"]), w)
                for r, w in zip(REVIEWS, words))
    with torch.no_grad():
        loss = task.loss(model, batch)
    assert float(loss) == pytest.approx(-total / sum(map(len, words)), rel=1e-4)


def test_single_token_words_keep_the_last_logit_fast_path(model, tokenizer):
    words = {"pos": " positive", "neg": " negative", "mid": " neutral"}
    task = Classification(label_words=words)
    task.check(dataset(REVIEWS), tokenizer)
    batch = task.collate(REVIEWS, tokenizer, 64)
    assert task.single_token and "choice_ids" not in batch
    ids = [tokens(tokenizer, w)[0] for w in words.values()]
    with torch.no_grad():
        full = [model(torch.tensor([tokenizer(task.prompt.format(text=r["text"]))["input_ids"]]))
                .logits[0, -1, ids].argmax() for r in REVIEWS]
    assert task.predict(model, batch).tolist() == [int(x) for x in full]


@pytest.mark.parametrize("words,message", [
    ({"a": " good", "b": " good"}, "are the same tokens"),
    ({"a": " good", "b": ""}, "has no tokens"),
])
def test_unusable_label_words_fail_clearly(tokenizer, words, message):
    with pytest.raises(SieveError, match=message):
        Classification(label_words=words).check(dataset([{"text": "x", "label": "a"}]), tokenizer)


def test_three_classes_from_a_local_csv(tmp_path, tokenizer, tiny_llama):
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, ["review", "stars"])
        writer.writeheader()
        for i in range(12):
            writer.writerow({"review": f"review number {i}", "stars": i % 3 + 1})
    task = Classification(prompt="{text}\nStars:", text_field="review", label_field="stars",
                          label_words={"1": " one", "2": " two", "3": " three"})
    data = TaskDataModule(source=str(path), task=task, batch_size=4,
                          sizes=SplitSizes(calibration=4, validation=4, test=4))
    data.prepare(tokenizer)
    batch = next(iter(data.val_dataloader()))
    assert set(batch["labels"].tolist()) <= {0, 1, 2}
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(task)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    acc = evaluate(trainer, lm, data.val_dataloader())
    preds = torch.cat([task.predict(lm.net, b) == b["labels"] for b in data.val_dataloader()])
    assert acc == pytest.approx(float(preds.float().mean()))


# --- multiple choice ---------------------------------------------------------------------------

MEDMCQA = [{"question": "Which vitamin deficiency causes scurvy?", "opa": "Vitamin A",
            "opb": "Vitamin C", "opc": "Vitamin D", "opd": "Vitamin K", "cop": 1},
           {"question": "The largest organ of the body is", "opa": "liver", "opb": "skin",
            "opc": "brain", "opd": "lung", "cop": 1},
           {"question": "Insulin is made in the", "opa": "pancreas", "opb": "kidney",
            "opc": "spleen", "opd": "heart", "cop": 0}]


def test_letter_scoring_reads_the_next_letter_token(model, tokenizer):
    task = MultipleChoice(options_field=["opa", "opb", "opc", "opd"], answer_field="cop")
    task.check(dataset(MEDMCQA), tokenizer)
    batch = task.collate(MEDMCQA, tokenizer, 128)
    prompt = task.render(MEDMCQA[0], task.options(MEDMCQA[0]))
    assert "A. Vitamin A\nB. Vitamin C\nC. Vitamin D\nD. Vitamin K\nAnswer:" in prompt
    assert batch["choice_ids"].shape == (3, 4, 1)  # one token per letter: last-logit path
    letters = [tokens(tokenizer, f" {c}")[0] for c in "ABCD"]
    expected = []
    for row in MEDMCQA:
        ids = tokenizer(task.render(row, task.options(row)))["input_ids"]
        with torch.no_grad():
            expected.append(int(model(torch.tensor([ids])).logits[0, -1, letters].argmax()))
    assert task.predict(model, batch).tolist() == expected
    assert batch["labels"].tolist() == [1, 1, 0]
    # calibration sees the prompt followed by the right letter
    assert batch["input_ids"][0, -1] == letters[1] and batch["answer_mask"].tolist() == [[1]] * 3


def test_loglik_scoring_equals_brute_force(model, tokenizer):
    rows = [{"q": "Best treatment for anaphylaxis?", "choices": ["adrenaline", "oral antihistamine",
                                                                 "reassurance alone"],
             "gold": "adrenaline"},
            {"q": "Normal adult resting heart rate?", "choices": ["60 to 100 per minute", "20"],
             "gold": "60 to 100 per minute"}]
    for normalize in (False, True):
        task = MultipleChoice(question_field="q", options_field="choices", answer_field="gold",
                              answer_type="text", scoring="loglik", length_normalize=normalize)
        task.check(dataset(rows), tokenizer)
        batch = task.collate(rows, tokenizer, 128)
        with torch.inference_mode():
            got = task.option_scores(model, batch)
        assert got[1, 2] == float("-inf")  # the second question has two options only
        for i, row in enumerate(rows):
            prompt = task.render(row, row["choices"])
            assert "A." not in prompt  # loglik prompts need not list the options
            for k, option in enumerate(row["choices"]):
                ids = tokens(tokenizer, " " + option)
                expected = logprob(model, tokenizer, prompt, ids) / (len(ids) if normalize else 1)
                assert float(got[i, k]) == pytest.approx(expected, abs=1e-4)
        assert batch["labels"].tolist() == [0, 0]


def test_fixed_options_with_nested_context_and_text_answers(model, tokenizer):
    rows = [{"question": "Does aspirin reduce fever?", "final_decision": "yes",
             "context": {"contexts": ["Aspirin is an antipyretic.", "It lowers temperature."]}},
            {"question": "Is the moon made of cheese?", "final_decision": "no",
             "context": {"contexts": ["The moon is rock."]}}]
    task = MultipleChoice(fixed_options=["yes", "no", "maybe"], answer_field="final_decision",
                          answer_type="text", context_field="context.contexts")
    task.check(dataset(rows), tokenizer)
    prompt = task.render(rows[0], task.options(rows[0]))
    assert prompt.startswith("Context: Aspirin is an antipyretic.\nIt lowers temperature.\n")
    assert "C. maybe" in prompt
    batch = task.collate(rows, tokenizer, 128)
    assert batch["labels"].tolist() == [0, 1]
    with pytest.raises(SieveError, match=r"not option texts \(yes, no, maybe\)"):
        task.check(dataset(rows + [{**rows[0], "final_decision": "perhaps"}]), tokenizer)


@pytest.mark.parametrize("kwargs,rows,message", [
    ({"options_field": ["opa", "opb", "opc", "opd"], "answer_field": "cop"},
     [{**MEDMCQA[0], "cop": -1}],
     r"answer values \['-1'\] of column 'cop' are not option indices \(0..3\)"),
    ({"options_field": ["opa", "opb", "opc", "opd"], "answer_field": "cop",
      "answer_type": "letter"}, [{**MEDMCQA[0], "cop": "E"}], "not option letters"),
])
def test_bad_answers_fail_before_any_work(tokenizer, kwargs, rows, message):
    with pytest.raises(SieveError, match=message):
        MultipleChoice(**kwargs).check(dataset(rows), tokenizer)


def test_multiple_choice_loss_is_the_answer_tokens_only(model, tokenizer):
    task = MultipleChoice(options_field=["opa", "opb", "opc", "opd"], answer_field="cop",
                          scoring="loglik")
    task.check(dataset(MEDMCQA), tokenizer)
    batch = task.collate(MEDMCQA, tokenizer, 128)
    with torch.no_grad():
        per_token = answer_logprobs(model, batch)
        loss = task.loss(model, batch)
    answers = [tokens(tokenizer, " " + task.options(r)[r["cop"]]) for r in MEDMCQA]
    for i, (row, ids) in enumerate(zip(MEDMCQA, answers)):
        prompt = task.render(row, task.options(row))
        assert float(per_token[i].sum()) == pytest.approx(logprob(model, tokenizer, prompt, ids),
                                                          abs=1e-4)
    assert float(loss) == pytest.approx(-float(per_token.sum()) / sum(map(len, answers)))
    # another right answer changes the loss; the prompt part (what is scored from) does not
    other = [{**r, "cop": (r["cop"] + 1) % 4} for r in MEDMCQA]
    changed = task.collate(other, tokenizer, 128)
    with torch.no_grad():
        assert float(task.loss(model, changed)) != pytest.approx(float(loss))
    assert torch.equal(prompt_part(changed)["input_ids"], prompt_part(batch)["input_ids"])


# --- generation --------------------------------------------------------------------------------

QA = [{"question": "What is the capital of France?", "context": ["Paris is in France."],
       "answers": {"text": ["Paris", "the city of Paris"]}},
      {"question": "How many legs has a spider?", "context": ["Spiders are arachnids.",
                                                               "They have eight legs."],
       "answers": {"text": ["eight"]}}]


def test_greedy_decoding_matches_generate(model, tokenizer):
    task = Generation(context_field="context", answer_field="answers.text", max_new_tokens=7,
                      stop=[])
    task.check(dataset(QA), tokenizer)
    batch = task.collate(QA, tokenizer, 128)
    prompts = prompt_part(batch)
    got = greedy_decode(model, prompts, 7, set())
    with torch.no_grad():
        ref = model.generate(input_ids=prompts["input_ids"],
                             attention_mask=prompts["attention_mask"], max_new_tokens=7,
                             do_sample=False, eos_token_id=None,
                             pad_token_id=tokenizer.pad_token_id)
    assert got == ref[:, prompts["input_ids"].shape[1]:].tolist()
    assert len({tuple(g) for g in got}) == 2  # the inputs really differ


def test_generation_batch_and_loss_use_the_reference_answer(model, tokenizer):
    task = Generation(context_field="context", answer_field="answers.text")
    task.check(dataset(QA), tokenizer)
    batch = task.collate(QA, tokenizer, 128)
    assert batch["references"] == [["Paris", "the city of Paris"], ["eight"]]
    target = tokens(tokenizer, " Paris\n")  # the first reference, then the stop string
    row = batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
    assert row[-len(target):] == target  # calibration sees prompt + answer
    assert "Context: Spiders are arachnids.\nThey have eight legs.\nQuestion:" in task.render(QA[1])
    with torch.no_grad():
        loss = task.loss(model, batch)
    answers = [target, tokens(tokenizer, " eight\n")]
    total = sum(logprob(model, tokenizer, task.render(r), a) for r, a in zip(QA, answers))
    assert float(loss) == pytest.approx(-total / sum(map(len, answers)), rel=1e-4)


def test_exact_match_and_f1_follow_squad():
    from torchmetrics.text import SQuAD

    assert normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert exact_match("the Paris.", "paris") == 1.0 and exact_match("Paris, France", "Paris") == 0
    assert token_f1("Paris, France", "Paris") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("a b", "c") == 0.0
    cases = [("Paris, France", "Paris"), ("an eight-legged spider", "eight legs"),
             ("in 1990", "1990"), ("no", "yes")]
    squad = SQuAD()
    result = squad([{"prediction_text": p, "id": str(i)} for i, (p, _) in enumerate(cases)],
                   [{"answers": {"answer_start": [0], "text": [r]}, "id": str(i)}
                    for i, (_, r) in enumerate(cases)])
    assert float(result["f1"]) / 100 == pytest.approx(sum(token_f1(p, r) for p, r in cases) / 4)
    assert float(result["exact_match"]) / 100 == sum(exact_match(p, r) for p, r in cases) / 4


def test_generation_scores_the_decoded_answer(model, tokenizer):
    task = Generation(context_field="context", answer_field="answers.text", max_new_tokens=4,
                      stop=[])
    task.check(dataset(QA), tokenizer)
    answers = task.generate(model, task.collate(QA, tokenizer, 128))
    assert all(answers)
    # references the model happens to produce (up to case and articles) and one it does not
    rows = [{**QA[0], "answers": {"text": ["nothing like it", "The " + answers[0].upper()]}},
            {**QA[1], "answers": {"text": [answers[1] + " extra words"]}}]
    scores = task.scores(model, task.collate(rows, tokenizer, 128))
    assert scores["exact_match"].tolist() == [1.0, 0.0]
    assert scores["f1"][0] == 1.0 and scores["f1"][1] == pytest.approx(
        token_f1(answers[1], answers[1] + " extra words"))
    assert task.metrics() == ["f1", "exact_match"]


def test_generation_through_lightning_and_the_search_fitness(tmp_path, tokenizer, tiny_llama):
    rows = [{"q": f"Question {i}?", "a": ["yes", "no"][i % 2]} for i in range(10)]
    task = Generation(question_field="q", answer_field="a", max_new_tokens=3, stop=["\n", "."])
    data = TaskDataModule(source=write_jsonl(tmp_path / "qa.jsonl", rows), task=task,
                          batch_size=3, sizes=SplitSizes(calibration=2, validation=5, test=3))
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(task)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    metrics = evaluate_metrics(trainer, lm, data.val_dataloader())
    assert list(metrics) == ["f1", "exact_match"]
    expected = torch.cat([task.scores(lm.net, b)["f1"] for b in data.val_dataloader()])
    assert metrics["f1"] == pytest.approx(float(expected.mean()))

    from sieve_pl.models.pruning import Pruner

    fitness = Fitness(trainer, lm, Pruner(lm.net, {}), data.val_dataloader())
    assert fitness.n == 5 and fitness.correct(1.0) == pytest.approx(expected.tolist())
    assert fitness.budget(0.8) == pytest.approx(1.0)


# --- data sources and field mapping ------------------------------------------------------------

def test_drug_reviews_builtin_loads_offline():
    two, three = load_source("drug_reviews"), load_source("drug_reviews_3class")
    assert two.column_names == ["text", "label"] == three.column_names
    assert set(two["label"]) == {"positive", "negative"}
    assert set(three["label"]) == {"positive", "negative", "neutral"}
    assert len(two) == 889 and len(three) == 979
    assert not any("&#039;" in t or t.startswith('"') for t in three["text"])
    assert any("I've" in t for t in three["text"])  # entities unescaped


@pytest.mark.parametrize("task", [
    Classification(text_field="review"),
    MultipleChoice(question_field="q", options_field=["opa", "opb"], answer_field="cop"),
    Generation(context_field="passage", answer_field="answers.text"),
], ids=["classification", "multiple_choice", "generation"])
def test_a_wrong_column_names_the_columns_that_exist(tmp_path, tokenizer, task):
    rows = [{"text": "t", "label": "fresh", "question": "q?", "answers": {"text": ["a"]}}] * 3
    data = TaskDataModule(source=write_jsonl(tmp_path / "d.jsonl", rows), task=task,
                          sizes=SplitSizes(calibration=1, validation=1, test=1))
    with pytest.raises(SieveError, match=r"dataset has no column .*; "
                                         r"columns: text, label, question, answers"):
        data.prepare(tokenizer)


def test_hub_id_path_reads_a_local_dataset_folder(tmp_path, tokenizer):
    folder = tmp_path / "org_medqa"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", MEDMCQA * 2)
    write_jsonl(folder / "validation.jsonl", MEDMCQA[:1])
    task = MultipleChoice(options_field=["opa", "opb", "opc", "opd"], answer_field="cop")
    data = TaskDataModule(source=str(folder), split="train", task=task, batch_size=2,
                          sizes=SplitSizes(calibration=2, validation=2, test=2))
    data.prepare(tokenizer)  # the same load_dataset(source, name, split) call as a hub id
    assert sum(len(s) for s in data.splits.values()) == 6
    assert len(load_source(str(folder), None, "validation")) == 1
    with pytest.raises(SieveError, match="cannot load dataset .* split 'test'"):
        load_source(str(folder), None, "test")


def test_split_sizes_are_not_shared_state():
    """The signature's default instance serves every datamodule built without sizes: it is
    frozen, so no datamodule can change another's (or the default's) sizes."""
    import dataclasses

    one, two = TaskDataModule(), TaskDataModule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        one.sizes.train = 5
    assert two.sizes == SplitSizes() and SplitSizes().train == 0
    three = TaskDataModule(sizes=dataclasses.replace(one.sizes, train=5))
    assert three.sizes.train == 5 and one.sizes.train == 0


def test_a_transfer_source_loads_once(tiny_data, monkeypatch):
    """The pipeline asks for each transfer source when it checks the data (twice: the CLI's
    check, then fit's) and when it scores it; the dataset is read once."""
    import sieve_pl.tasks.datamodule as datamodule

    loads = []

    def counting(source, *args, **kwargs):
        loads.append(source)
        return load_source(source, *args, **kwargs)

    monkeypatch.setattr(datamodule, "load_source", counting)
    labels = {"positive": "fresh", "negative": "rotten"}
    first = tiny_data.other_source("drug_reviews", labels, 6)
    assert tiny_data.other_source("drug_reviews", dict(labels), 6) is first
    tiny_data.other_source("drug_reviews", labels, 6)
    assert loads == ["drug_reviews"] and len(first.splits["test"]) == 6
    tiny_data.other_source("drug_reviews", labels, 4)  # another draw is another datamodule
    assert loads == ["drug_reviews"] * 2


def test_scored_splits_are_sorted_by_length_and_subsets_spread_over_them(tokenizer):
    data = TaskDataModule(sizes=SplitSizes(calibration=4, validation=40, test=30), batch_size=8)
    data.prepare(tokenizer)
    again = TaskDataModule(sizes=SplitSizes(calibration=4, validation=40, test=30), batch_size=8)
    again.prepare(tokenizer)
    for split in ("validation", "test"):
        lengths = [int(x) for b in data.loader(split) for x in b["attention_mask"].sum(1)]
        assert lengths == sorted(lengths) and lengths[0] < lengths[-1]
        assert data.splits[split]["text"] == again.splits[split]["text"]  # deterministic
    spread = [int(x) for b in data.loader("test", limit=5) for x in b["attention_mask"].sum(1)]
    lengths = sorted(int(x) for b in data.loader("test") for x in b["attention_mask"].sum(1))
    assert spread == [lengths[i * 30 // 5] for i in range(5)]  # not the 5 shortest


def test_fitness_scores_hardest_first_in_length_sorted_runs(tiny_llama, tokenizer):
    data = TaskDataModule(sizes=SplitSizes(calibration=4, validation=40, test=4), batch_size=5)
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(data.task)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    from sieve_pl.models.pruning import Pruner
    fitness = Fitness(trainer, lm, Pruner(lm.net, {}), data.val_dataloader())
    order = list(range(40))[::-1]
    fitness.reorder(order)
    assert sorted(fitness.order) == list(range(40))
    for start in range(0, 40, 20):  # each run of 4 batches: the same examples, by length
        run = fitness.order[start:start + 20]
        assert set(run) == set(order[start:start + 20])
        assert [fitness.lengths[i] for i in run] == sorted(fitness.lengths[i] for i in run)
    before = list(fitness.order)
    fitness.reorder(before)
    assert fitness.order == before  # idempotent: a resumed search scores in the same order
    scored = [int(x) for b in fitness.batches for x in b["attention_mask"].sum(1)]
    assert scored == [fitness.lengths[i] for i in fitness.order]


def test_chat_template_formats_every_prompt_as_a_user_turn(tokenizer):
    """data.chat_template: prompts go through the tokenizer's chat template (the assistant's
    turn opened, no special tokens added twice), the task's fingerprint says so, transfer
    sources share it, and a tokenizer without a template is refused in one line."""
    from sieve_pl.errors import SieveError
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    plain = TaskDataModule(sizes=SplitSizes(calibration=2, validation=2, test=2))
    plain.prepare(tokenizer)
    fingerprint = plain.fingerprint_config("calibration")
    chat = TaskDataModule(sizes=SplitSizes(calibration=2, validation=2, test=2),
                          chat_template=True)
    chat.prepare(tokenizer)
    row = chat.splits["test"][0]
    prompt = chat.task.prompt_text(row)
    batch = chat.task.collate([row], tokenizer, 256)
    text = tokenizer.decode(batch["input_ids"][0][batch["attention_mask"][0].bool()])
    assert text == tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 tokenize=False, add_generation_prompt=True)
    assert text.startswith("<|im_start|>") and text.endswith("<|im_start|>assistant\n")
    assert chat.fingerprint_config("calibration") != fingerprint
    other = chat.other_source("drug_reviews", {"positive": "fresh", "negative": "rotten"}, 2)
    assert other.task.chat_template and chat.task.chat_template
    no_template = copy.deepcopy(tokenizer)
    no_template.chat_template = None
    with pytest.raises(SieveError, match="has no chat template"):
        TaskDataModule(chat_template=True).prepare(no_template)


def test_encoding_never_changes_the_tokenizer(tokenizer):
    """Loading sets left padding and truncation once; encoding reads them, and a tokenizer
    set otherwise is refused with the fix rather than changed behind the caller's back."""
    from sieve_pl.models.loading import left_padded
    from sieve_pl.tasks.base import encode_prompts

    assert (tokenizer.padding_side, tokenizer.truncation_side) == ("left", "left")
    other = copy.deepcopy(tokenizer)
    other.padding_side = "right"
    with pytest.raises(SieveError, match="left_padded"):
        encode_prompts(other, ["a b c", "d"], 8)
    assert other.padding_side == "right"
    batch = encode_prompts(left_padded(other), ["a b c", "d"], 8)
    assert batch["attention_mask"][:, -1].all()  # padded on the left
