"""Genetic search: exact early rejection, lazy scoring == scoring everything, the caches,
resume == uninterrupted; refit."""
from __future__ import annotations

import random

import pytest
import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.stages.refit import refit
from sieve_pl.stages.search import Fitness, GeneticSearch, SearchConfig, search
from sieve_pl.models.forward import last_logits
from sieve_pl.tasks import SplitSizes, TaskDataModule


def _build(tiny_llama, tokenizer):
    import lightning as L

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False)
    data = TaskDataModule(sizes=SplitSizes(calibration=16, validation=40, test=8), batch_size=6)
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(data.task)
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    pruner = Pruner(lm.net, project(lm.net, groups, stats, ProjectionConfig()))
    return trainer, lm, pruner, data


@pytest.fixture(scope="module")
def setup(tiny_llama, tokenizer):
    return _build(tiny_llama, tokenizer)


CONFIG = SearchConfig(epsilon=0.1, population=6, generations=3, elite=1, seed=3,
                      gene_mutation_prob=0.2)


def _fitness(setup, early_reject=True, confidence=0.0):
    trainer, lm, pruner, data = setup
    return Fitness(trainer, lm, pruner, data.val_dataloader(), early_reject, confidence)


@pytest.mark.parametrize("confidence", [0.0, 1.0])
def test_early_rejection_never_changes_a_decision(setup, confidence):
    names = list(setup[2].dense)
    ladder = [1.0, 0.7, 0.4, 0.1]
    rng = random.Random(0)
    genomes = [[rng.randint(0, d) for _ in names] for d in (0, 1, 2, 3, 3, 3, 2, 1)]
    fast, full = _fitness(setup, True, confidence), _fitness(setup, False, confidence)
    for fitness in (fast, full):
        fitness.hardest_first()
    base = full.accuracy(1.0)
    target = CONFIG.target(base)
    ga_fast = GeneticSearch(fast, names, ladder, target, CONFIG, None)
    ga_full = GeneticSearch(full, names, ladder, target, CONFIG, None)
    decisions = set()
    for genome in genomes:
        a, b = ga_fast.score(genome), ga_full.score(genome)
        assert a["feasible"] == b["feasible"] and a["value"] == pytest.approx(b["value"])
        assert b["seen"] == full.n and a["seen"] <= full.n
        decisions.add(a["feasible"])
    assert decisions == {True, False}, "the genomes must include feasible and infeasible ones"
    assert fast.tokens_spent < full.tokens_spent  # rejection saved work


def test_cache_prevents_reevaluation(setup):
    fitness = _fitness(setup)
    result = search(fitness, list(setup[2].dense), CONFIG, None)
    assert result.feasible and result.accuracy >= result.target
    # lazy: genomes that could not win were never scored on the whole split
    assert result.scored_genomes < result.distinct_genomes
    assert result.distinct_genomes < CONFIG.population * (CONFIG.generations + 1)
    assert result.cost["search_tokens"] < result.cost["naive_tokens"]


class EagerSearch(GeneticSearch):
    """The same GA scoring every contender before choosing (DEAP's plain selection)."""

    def best(self, genomes, k, full=True):
        values = [self.score(g)["value"] for g in genomes]
        return [genomes[i] for i in sorted(range(len(genomes)), key=lambda i: -values[i])[:k]]


def test_lazy_scoring_takes_the_decisions_of_scoring_everything(setup, monkeypatch):
    names = list(setup[2].dense)
    config = SearchConfig(epsilon=0.02, min_keep=0.6, population=8, generations=4, elite=2, seed=5,
                          gene_mutation_prob=0.2, screen=1.0)
    lazy = search(_fitness(setup), names, config, None)
    import sieve_pl.stages.search as module

    monkeypatch.setattr(module, "GeneticSearch", EagerSearch)
    eager = search(_fitness(setup), names, config, None)
    assert lazy.genome == eager.genome and lazy.value == eager.value
    assert [r["best"] for r in lazy.logbook] == [r["best"] for r in eager.logbook]
    assert lazy.distinct_genomes == eager.distinct_genomes  # the same genomes were bred
    assert lazy.scored_genomes < eager.scored_genomes == eager.distinct_genomes
    assert lazy.cost["ga_tokens"] < eager.cost["ga_tokens"]


def test_hardest_examples_are_scored_first(setup):
    fitness = _fitness(setup)
    base = fitness.hardest_first()
    assert 0 < sum(base) < len(base), "the tiny model must get some examples wrong"
    again = fitness.correct(1.0)
    margins = fitness.correct(1.0, measure=setup[1].task.confidence)
    # wrong ones first, then the least safe: in runs of 4 batches (each sorted by length)
    chunk = 4 * fitness.loader.batch_size
    runs = [list(zip(again[s:s + chunk], margins[s:s + chunk]))
            for s in range(0, len(again), chunk)]
    assert len(runs) > 1
    assert sorted(again) == sorted(base)
    assert [x for run in runs for x in sorted(run)] == sorted(zip(again, margins))
    assert all(m <= 0 for m, s in zip(margins, again) if s == 0)
    assert all(m >= 0 for m, s in zip(margins, again) if s == 1)


def test_screening_is_continued_not_redone_and_its_rejections_are_final(setup):
    names = list(setup[2].dense)
    screened, full = _fitness(setup), _fitness(setup)
    budget = screened.budget(0.9 * screened.accuracy(1.0))
    full.tokens_spent = screened.tokens_spent = 0
    rng = random.Random(1)
    for level in (0.9, 0.5, 0.2, 0.05):
        keep = {n: rng.choice([1.0, level]) for n in names}
        part = screened.judge(keep, budget, until=screened.n // 2)
        done = screened.judge(keep, budget)
        reference = full.judge(keep, budget)
        assert done == reference and not done.provisional and done.scores is None
        assert part.provisional == (part.feasible and reference.seen > part.seen)
        if not part.feasible:
            assert done is part or done == part
    assert screened.tokens_spent == full.tokens_spent  # nothing scored twice


def test_a_budget_of_a_few_errors_is_warned_about(setup):
    config = SearchConfig(epsilon=0.001, strategy="uniform")
    with pytest.warns(UserWarning, match=r"allows 0\.\d more lost score .* on 40 validation"):
        search(_fitness(setup), list(setup[2].dense), config, None)


def test_screened_search_ends_within_epsilon_on_the_whole_split(setup):
    fitness = _fitness(setup)
    config = SearchConfig(epsilon=0.02, min_keep=0.6, population=8, generations=4, elite=2, seed=5,
                          gene_mutation_prob=0.2, screen=0.3)
    result = search(fitness, list(setup[2].dense), config, None)
    assert result.feasible and result.accuracy >= result.target
    assert _fitness(setup).accuracy(result.levels) == pytest.approx(result.accuracy)


def test_a_search_with_parked_dense_weights_takes_the_same_decisions(setup, tmp_path):
    """Parking (the dense weights of pruned units on disk) changes memory, not results: the
    same GA ends at the same levels with the same score, and the model is dense after it."""
    pruner = setup[2]
    names = list(pruner.dense)
    plain = search(_fitness(setup), names, CONFIG, None)
    pruner.park = tmp_path
    try:
        parked = search(_fitness(setup), names, CONFIG, None)
        assert list(tmp_path.glob("*.safetensors"))  # something was parked
    finally:
        pruner.park = None
    assert parked.levels == plain.levels and parked.accuracy == plain.accuracy
    assert all(u.parked is None for u in pruner.units.values())  # back at dense: all read back


class Killed(Exception):
    pass


def test_resume_after_interruption_equals_uninterrupted(setup, tmp_path):
    names = list(setup[2].dense)
    (tmp_path / "a").mkdir()
    uninterrupted = search(_fitness(setup), names, CONFIG, tmp_path / "a")

    work = tmp_path / "b"
    work.mkdir()
    fitness = _fitness(setup)
    calls = {"n": 0}
    correct = fitness._correct  # (every scoring pass, one evaluation each)

    def dying(*args, **kwargs):  # dies mid-generation 2
        calls["n"] += 1
        if calls["n"] > kill_after:
            raise Killed
        return correct(*args, **kwargs)

    cost = uninterrupted.cost
    kill_after = cost["evaluations"] - cost["ga_evaluations"] // 3
    fitness._correct = dying
    with pytest.raises(Killed):
        search(fitness, names, CONFIG, work)
    assert (work / "state.json").exists()
    resumed = search(_fitness(setup), names, CONFIG, work)
    for key in ("genome", "levels", "value", "accuracy", "logbook", "bottlenecks"):
        assert getattr(resumed, key) == getattr(uninterrupted, key), key
    assert resumed.cost == uninterrupted.cost


def test_a_search_state_of_another_format_is_recomputed(setup, tmp_path):
    """uniform.json written by another version of the code is not misread on resume."""
    import json

    names = list(setup[2].dense)
    config = SearchConfig(epsilon=0.001, strategy="uniform")
    first = search(_fitness(setup), names, config, tmp_path)
    state = json.loads((tmp_path / "uniform.json").read_text())
    state.update(format=1, base_accuracy=0.123)
    (tmp_path / "uniform.json").write_text(json.dumps(state))
    again = search(_fitness(setup), names, config, tmp_path)
    assert again.base_accuracy == first.base_accuracy != 0.123
    assert json.loads((tmp_path / "uniform.json").read_text())["format"] != 1


def _inputs(net, module, data):
    """Inputs of ``module`` over the calibration tokens (padding removed)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    for batch in data.calibration_dataloader():
        last_logits(net, batch)
    handle.remove()
    masks = [b["attention_mask"].bool() for b in data.calibration_dataloader()]
    return torch.cat([x[m] for x, m in zip(seen, masks)]).double()


def test_refit_lowers_error_on_the_pruned_models_inputs(tiny_llama, tokenizer):
    trainer, lm, pruner, data = _build(tiny_llama, tokenizer)
    groups = lm.adapter.input_groups(lm.net)
    levels = dict.fromkeys(pruner.dense, 0.5)
    with pytest.raises(ValueError, match="put the model at the levels"):
        refit(trainer, lm.net, pruner, levels, data.calibration_dataloader(), 1e-6)
    with pruner.at(levels):
        factors = refit(trainer, lm.net, pruner, levels, data.calibration_dataloader(), 1e-6)
    assert set(factors) == set(pruner.dense)
    pruner.use(factors)
    ranks = pruner.apply(levels)
    names = groups["model.layers.1.attn_in"]  # inputs shaped by the refitted layer 0
    x_tilde = _inputs(lm.net, lm.net.get_submodule(names[0]), data)
    pruner.apply(1.0)
    x = _inputs(lm.net, lm.net.get_submodule(names[0]), data)
    gains = []
    for name in names:
        w = pruner.dense[name].weight.detach().double()
        r = ranks[name]
        a, b = (t.double() for t in pruner.units[name].factors(r))
        before = float(((x @ w.T - x_tilde @ (b @ a).T) ** 2).sum())
        a2, b2 = (t.double() for t in factors[name])
        after = float(((x @ w.T - x_tilde @ (b2 @ a2).T) ** 2).sum())
        assert after <= before * (1 + 1e-6)
        gains.append(before - after)
    assert max(gains) > 0


def test_sequential_refit_of_neurons_lowers_the_mlp_error_on_the_pruned_models_inputs(
        tiny_llama, tokenizer):
    """Layer 1's MLP, refitted on the inputs of a model pruned (and refitted) in layer 0, matches
    the dense MLP's output on dense inputs better than the refit from dense statistics alone."""
    trainer, lm, _, data = _build(tiny_llama, tokenizer)
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    pruner = Pruner(lm.net, project(lm.net, groups, stats, ProjectionConfig(),
                                    mlps=lm.adapter.mlps(lm.net)))
    levels = {n: 0.5 for n in pruner.names}
    down = "model.layers.1.mlp.down_proj"
    target = _inputs(lm.net, lm.net.get_submodule(down), data) @ \
        pruner.units["model.layers.1.mlp"].dense[down].weight.detach().double().T

    def error() -> float:
        module = lm.net.get_submodule(down)
        return float((_inputs(lm.net, module, data) @ module.weight.detach().double().T
                      - target).square().sum())

    pruner.apply(levels)
    before = error()
    factors = refit(trainer, lm.net, pruner, levels, data.calibration_dataloader(), 1e-6)
    assert set(factors) == set(pruner.names)
    assert factors["model.layers.1.mlp"][0].shape == (32, 24)  # (hidden, neurons kept)
    after = error()  # the model is left at the refitted levels
    pruner.refitted = factors
    pruner.apply(levels)
    assert error() == after  # the Pruner reproduces the refitted model
    assert after < before
    pruner.apply(1.0)


def test_confidence_bound_refuses_what_lucky_fixes_rescue(setup):
    """Same lost score, more examples answered differently from the base model: the bound
    spends more of the budget; with confidence 0 it is the plain accuracy constraint."""
    fitness = _fitness(setup, confidence=1.0)
    fitness.base = [1.0, 1.0, 0.0, 0.0]
    same = [1.0, 1.0, 0.0, 0.0]
    swapped = [0.0, 0.0, 1.0, 1.0]  # two broken, two fixed: the same accuracy
    assert list(fitness.excess(same))[-1] == 2.0
    assert list(fitness.excess(swapped))[-1] == pytest.approx(2.0 + 2.0)
    assert all(b >= a for a, b in zip(fitness.excess(swapped), list(fitness.excess(swapped))[1:]))
    fitness.confidence = 0.0
    assert list(fitness.excess(swapped))[-1] == 2.0


def test_the_search_draws_from_its_own_random_stream(setup):
    """The GA neither seeds nor draws from the process-global ``random``; its seed alone
    decides what it breeds."""
    names = list(setup[2].dense)
    random.seed(1234)
    before = random.getstate()
    first = search(_fitness(setup), names, CONFIG, None)
    assert random.getstate() == before
    random.seed(99)  # another global state: the same search
    second = search(_fitness(setup), names, CONFIG, None)
    assert first.genome == second.genome and first.logbook == second.logbook
    assert first.distinct_genomes == second.distinct_genomes


def test_verdicts_keep_their_json_form():
    """A Verdict is saved (the search's resumable state) as the dict it replaced."""
    from sieve_pl.stages.fitness import Verdict

    final = Verdict(False, 39.5, 40, 0.8, pool=Verdict(False, 3, 4, None))
    part = Verdict(True, None, 20, None, provisional=True, scores=[1.0, 0.0])
    assert final.record() == {"feasible": False, "over_at": 39.5, "seen": 40, "accuracy": 0.8,
                              "pool": {"feasible": False, "over_at": 3, "seen": 4,
                                       "accuracy": None}}
    assert part.record() == {"feasible": True, "over_at": None, "seen": 20, "accuracy": None,
                             "scores": [1.0, 0.0], "provisional": True}
    assert "scores" not in part.record(scores=False)
    for verdict in (final, part):
        assert Verdict.from_record(verdict.record()) == verdict


def test_search_results_keep_their_json_form(setup):
    """search.json holds the same keys as before the result was typed: the strategy's own."""
    from sieve_pl.stages.search import SearchResult

    names = list(setup[2].dense)
    common = {"levels", "accuracy", "base_accuracy", "target", "kept", "feasible", "cost",
              "uniform", "path", "seeds", "validation_examples", "validation_tokens"}
    uniform = search(_fitness(setup), names, SearchConfig(epsilon=0.1, strategy="uniform"), None)
    assert set(uniform.record()) == common
    genetic = search(_fitness(setup), names, CONFIG, None)
    assert set(genetic.record()) == common | set(SearchResult.GENETIC)
    assert SearchResult.from_record(genetic.record()) == genetic
