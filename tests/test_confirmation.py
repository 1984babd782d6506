"""Selection that holds out of sample: the pool's agreement with the dense model, the
confirmation split and its step back, the floor no unit goes below, the model's own Fisher."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.confirm import confirm
from sieve_pl.stages.fitness import Fitness, pool_fitness
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.stages.search import SearchConfig
from sieve_pl.stages.stage import lora_gate
from sieve_pl.tasks import SplitSizes, TaskDataModule


@pytest.fixture(scope="module")
def setup(tiny_llama, tokenizer):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = TaskDataModule(sizes=SplitSizes(calibration=16, validation=30, test=6, train=10,
                                           confirmation=30), batch_size=6)
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(data.task)
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig(), mlps=lm.adapter.mlps(lm.net))
    return trainer, lm, bases, data


def test_the_pool_scores_agreement_with_the_dense_answers_hardest_first(setup):
    trainer, lm, bases, data = setup
    pruner = Pruner(lm.net, bases)
    pool = pool_fitness(trainer, lm, pruner, data)
    assert pool.n == len(data.pool()) == 26  # calibration and train prompts
    assert pool.correct(1.0) == [1.0] * pool.n  # the dense model agrees with itself
    cut = pool.correct(0.2)
    assert 0 < sum(cut) < pool.n
    # the prompts whose dense answer wins by the least come first (at the grain of runs of 4
    # batches, each sorted by length): cuts flip them first
    pruner.apply(1.0)
    with torch.no_grad():
        margins = []
        for batch in pool.batches:
            top = lm.task.answer_logprobs(lm.net, batch).topk(2, -1).values
            margins += (top[:, 0] - top[:, 1]).tolist()
    run = 4 * 6
    assert max(margins[:run]) <= min(margins[run:]) + 1e-5
    assert pool.judge(0.2, 0.0).feasible is False and pool.judge(1.0, 0.0).feasible


def test_a_candidate_must_also_hold_the_pool(setup):
    trainer, lm, bases, data = setup
    pruner = Pruner(lm.net, bases)
    fitness = Fitness(trainer, lm, pruner, data.val_dataloader())
    fitness.hardest_first()
    loose = fitness.budget(0.0)  # any validation accuracy passes
    assert fitness.judge(0.3, loose).feasible
    fitness.memo.clear()
    fitness.pool = pool_fitness(trainer, lm, pruner, data)
    fitness.pool_share = 0.0  # no expected loss on the pool
    verdict = fitness.judge(0.3, loose)
    assert not verdict.feasible and verdict.pool.feasible is False
    # ranked above any validation failure, below any feasible candidate
    assert fitness.n - 1 <= verdict.over_at < fitness.n
    assert fitness.judge(1.0, loose).feasible
    state = fitness.state()
    assert "pool" in state and state["pool"]["memo"]


def test_confirmation_keeps_levels_that_pass_and_steps_back_from_those_that_fail(setup):
    trainer, lm, bases, data = setup
    pruner = Pruner(lm.net, bases)
    names = pruner.names
    check = Fitness(trainer, lm, pruner, data.confirmation_dataloader(), confidence=2.0)
    light = dict.fromkeys(names, 0.95)
    passed = confirm(check, light, names, SearchConfig(epsilon=0.9))
    assert passed["passed"] and passed["levels"] == light and passed["examples"] == 30
    deep = dict.fromkeys(names, 0.1)
    # along a price path: the path's steps undone from its expensive end
    path = [[n, 0.1, 1] for n in names]
    strict = SearchConfig(epsilon=1e-3)  # no answer may change
    stepped = confirm(check, deep, names, strict, path)
    assert not stepped["passed"] and len(stepped["history"]) > 1
    assert all(stepped["levels"][n] >= deep[n] for n in names)
    assert pruner.params(stepped["levels"])[0] > pruner.params(deep)[0]
    assert check.judge(stepped["levels"], check.budget(strict.target(
        stepped["base_accuracy"]))).feasible
    # without a path: every cut scaled towards none
    scaled = confirm(check, deep, names, strict)
    assert not scaled["passed"]
    assert all(deep[n] <= scaled["levels"][n] <= 1 for n in names)


def test_recovery_weights_fit_only_units_left_at_their_size(setup):
    """A unit stepped back drops the LoRA trained for its old size; every other unit keeps
    it, in scoring and in the model the pruner builds."""
    trainer, lm, bases, data = setup
    pruner = Pruner(lm.net, bases)
    names = pruner.names
    deep = dict.fromkeys(names, 0.5)
    with pruner.at(deep):
        weights = {n: p.detach() + 0.01 for n, p in lm.net.named_parameters() if ".layers." in n}
    moved = next(n for n in names if "mlp" in n)
    back = {**deep, moved: 1.0}
    with pruner.at(back, weights):
        fit = pruner.fitting(weights)
        params = dict(lm.net.named_parameters())
        for name, value in fit.items():
            torch.testing.assert_close(params[name].data, value)
    left_out = set(weights) - set(fit)
    assert left_out and all(any(k.startswith(m + ".") for m in pruner.units[moved].dense)
                            for k in left_out)
    with pruner.at(deep):
        assert pruner.fitting(weights).keys() == weights.keys()
    # the confirmation scorer uses them where they fit; the base model never gets them
    check = Fitness(trainer, lm, pruner, data.confirmation_dataloader(), confidence=2.0)
    base = check.hardest_first()
    margin = lm.task.confidence
    plain = check.correct(back, measure=margin)
    check.weights = weights
    assert check.hardest_first() == base
    assert check.correct(back, measure=margin) != plain
    pruner.apply(1.0)
    assert pruner.keep == 1.0


def test_the_floor_keeps_every_unit_above_the_smallest_rung_after_rounding(setup):
    _, lm, bases, _ = setup
    floored = Pruner(lm.net, bases, rank_multiple=8, floor=0.4)
    plain = Pruner(lm.net, bases, rank_multiple=8)
    for name, unit in floored.units.items():
        size = floored.sizes({name: 0.4}).get(name)
        assert size is None or unit.params(size) >= 0.4 * unit.total, name
        low = plain.sizes({name: 0.4}).get(name)
        assert low is None or size is None or size >= low
    kept, total = floored.params(0.05)
    assert kept >= 0.4 * total


def test_units_sizes_at_least_a_share(setup):
    _, lm, bases, _ = setup
    pruner = Pruner(lm.net, bases, rank_multiple=4)
    for unit in pruner.units.values():
        for share in (0.1, 0.4, 0.75):
            size = unit.at_least(share, 4)
            if size is not None:
                assert unit.params(size) >= share * unit.total



def test_model_fisher_costs_are_label_free(setup, monkeypatch):
    """The model's own Fisher never reads a label: the costs are the same with labels
    shuffled."""
    from sieve_pl.stages.sensitivity import gradient_moments

    trainer, lm, _, data = setup
    outputs = ["model.layers.1.mlp.down_proj"]
    batches = list(data.calibration_dataloader())
    first = gradient_moments(trainer, lm.net, lm.task, outputs, batches, fisher="model")
    for batch in batches:
        batch["labels"] = 1 - batch["labels"]
    again = gradient_moments(trainer, lm.net, lm.task, outputs, batches, fisher="model")
    torch.testing.assert_close(first[outputs[0]], again[outputs[0]])
    label = gradient_moments(trainer, lm.net, lm.task, outputs, batches, fisher="label")
    assert not torch.allclose(first[outputs[0]], label[outputs[0]])


def test_lora_is_exported_only_when_its_confirmation_gain_beats_the_noise():
    """The gate pairs each example's score with and without LoRA: a gain of 2 answers among
    10 changed is within one standard error (sqrt(10)), 8 among 10 is not; a loss is never
    kept, and keep_z 0 is the old rule (not lower)."""
    plain = [1.0] * 60 + [0.0] * 40
    small = [1.0] * 56 + [0.0] * 4 + [1.0] * 6 + [0.0] * 34  # 4 broken, 6 fixed
    gate = lora_gate(plain, small, 1.0)
    assert not gate["keep"] and gate["changed"] == 10 and gate["examples"] == 100
    assert gate["gain"] == pytest.approx(0.02)
    assert lora_gate(plain, small, 0.0)["keep"]
    clear = [1.0] * 59 + [0.0] + [1.0] * 9 + [0.0] * 31  # 1 broken, 9 fixed
    assert lora_gate(plain, clear, 1.0)["keep"] and not lora_gate(plain, clear, 3.0)["keep"]
    assert not lora_gate(small, plain, 0.0)["keep"]
    assert lora_gate(plain, plain, 1.0)["keep"]  # changes nothing: harmless either way


def test_the_other_variant_is_tried_at_the_searched_levels_before_any_step_back(setup):
    """Weights that fail confirmation where the plain model passes: confirm tries the plain
    model at the same levels (no step back) and ends with it."""
    trainer, lm, bases, data = setup
    pruner = Pruner(lm.net, bases)
    names = pruner.names
    dense = dict.fromkeys(names, 1.0)
    with pruner.at(dense):
        broken = {n: p.detach() + 0.5 for n, p in lm.net.named_parameters()
                  if ".layers." in n and n.endswith(".weight")}
    check = Fitness(trainer, lm, pruner, data.confirmation_dataloader(), confidence=2.0)
    check.weights = broken
    strict = SearchConfig(epsilon=1e-3)  # no answer may change
    result = confirm(check, dense, names, strict, other={})
    assert result["passed"] and result["levels"] == dense and check.weights == {}
    assert [h["step"] for h in result["history"]] == [0, 0]
    assert [h["feasible"] for h in result["history"]] == [False, True]
    pruner.apply(1.0)
