"""Every stage of the pipeline on the fake accelerator (tests/fake_accelerator.py), called as
the pipeline calls it, on a tiny random Llama.

The model waits on the host and Lightning's loops move it to the device and back (calibrate,
refit, distill, recover, evaluate), or it is on the device already (projection of a layer on
the device, the search's fitness, which moves it there, sensitivity and the cuts after it).
A stage that mixes host and device tensors raises here as it would on CUDA. (Before the unit
kinds became device-aware, the sensitivity costs, every head-unit cut on the device and so the
default search failed here: bases and statistics on the host, weights on the device.)
"""
from __future__ import annotations

import pytest
import torch

import fake_accelerator as fake
from fake_accelerator import DEVICE, FakeTensor
from sieve_pl.models.forward import last_logits
from sieve_pl.models.module import SieveLM, evaluate
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.tasks import SplitSizes, TaskDataModule

CONFIGS = {"factored": ProjectionConfig(),  # q/k/v/o factored, MLP neurons (the default)
           "heads": ProjectionConfig(attention="heads")}  # v/o as head units


WITH_HEADS = "heads"


@pytest.fixture(scope="module")
def data(tokenizer):
    data = TaskDataModule(sizes=SplitSizes(calibration=8, validation=8, test=4, train=6),
                          batch_size=4)
    data.prepare(tokenizer)
    return data


def _lm(path, data) -> SieveLM:
    lm = SieveLM(path)
    lm.load()
    lm.set_task(data.task)
    return lm


@pytest.fixture(scope="module")
def calibrated(tiny_llama, data):
    """The input groups and calibration statistics (host tensors), computed once on the fake
    accelerator."""
    with fake.fake_device():
        lm = _lm(tiny_llama, data)
        groups = lm.adapter.input_groups(lm.net)
        return groups, calibrate(fake.fake_trainer(), lm.net, groups,
                                 data.calibration_dataloader(), CalibrationConfig())


@pytest.fixture
def lm(tiny_llama, data, fake_device):
    return _lm(tiny_llama, data)


def _project(lm, groups, stats, config: ProjectionConfig):
    return project(lm.net, groups, stats, config, mlps=lm.adapter.mlps(lm.net),
                   attentions=lm.adapter.attentions(lm.net))


def _pruner(lm, calibrated, name: str = "factored") -> Pruner:
    """The model on the device (where the search's fitness leaves it), its bases projected
    there, and its Pruner."""
    groups, stats = calibrated
    lm.net.to(DEVICE)
    return Pruner(lm.net, _project(lm, groups, stats, CONFIGS[name]))


@pytest.fixture
def factored(lm, calibrated):
    return _pruner(lm, calibrated)


def _on_device(net) -> bool:
    return all(isinstance(p, FakeTensor) for p in net.parameters())


def test_calibrate_gives_the_cpu_statistics(lm, data, fake_trainer, trainer):
    groups = lm.adapter.input_groups(lm.net)
    expected = calibrate(trainer, lm.net, groups, data.calibration_dataloader(),
                         CalibrationConfig())
    for config in (CalibrationConfig(), CalibrationConfig(device="cpu")):
        got = calibrate(fake_trainer, lm.net, groups, data.calibration_dataloader(), config)
        assert got.keys() == expected.keys()
        for key, value in got.items():
            assert type(value) is torch.Tensor  # host tensors, as saved
            # (attention on the fake device takes another kernel path: float32 rounding)
            torch.testing.assert_close(value, expected[key], rtol=1e-4, atol=1e-5)
    assert not _on_device(lm.net)  # the model waited on the host


def test_calibration_holds_one_layer_on_the_device_at_a_time(lm, data, fake_trainer,
                                                            monkeypatch):
    from sieve_pl.models import sequential

    seen = []
    original = sequential.run_layer

    def run_layer(layer, index, batch, device):
        seen.append([_on_device(block) for block in lm.net.model.layers])
        assert not any(isinstance(p, FakeTensor) for p in lm.net.model.embed_tokens.parameters())
        return original(layer, index, batch, device)
    monkeypatch.setattr(sequential, "run_layer", run_layer)
    calibrate(fake_trainer, lm.net, lm.adapter.input_groups(lm.net),
              data.calibration_dataloader(), CalibrationConfig())
    layers = len(lm.net.model.layers)
    assert seen and all(sum(flags) == 1 for flags in seen)
    assert {flags.index(True) for flags in seen} == set(range(layers))


@pytest.mark.parametrize("name", list(CONFIGS))
def test_project_on_the_device_gives_the_cpu_bases(lm, calibrated, name):
    groups, stats = calibrated
    expected = _project(lm, groups, stats, CONFIGS[name])
    lm.net.to(DEVICE)
    got = _project(lm, groups, stats, CONFIGS[name])
    assert got.keys() == expected.keys()
    for unit in got:
        for field, value in got[unit].tensors().items():
            assert type(value) is torch.Tensor, (unit, field)  # bases live on the host
            torch.testing.assert_close(value, expected[unit].tensors()[field],
                                       rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["factored", WITH_HEADS])
def test_pruner_cuts_every_unit_on_the_device(name, lm, calibrated, data):
    pruner = _pruner(lm, calibrated, name)
    batch = {k: v.to(DEVICE) for k, v in next(iter(data.val_dataloader())).items()}
    with torch.no_grad():
        dense = last_logits(pruner.model, batch)
        for unit in pruner.names:
            with pruner.at({unit: 0.5}):
                assert _on_device(pruner.model), unit
                assert last_logits(pruner.model, batch).device == DEVICE
        with pruner.at(0.5):
            assert not torch.allclose(last_logits(pruner.model, batch), dense)
    assert _on_device(pruner.model)


@pytest.mark.parametrize("name", ["factored", WITH_HEADS])
def test_fitness_scores_levels(name, lm, calibrated, data, fake_trainer):
    from sieve_pl.stages.fitness import Fitness

    pruner = _pruner(lm, calibrated, name)
    fitness = Fitness(fake_trainer, lm, pruner, data.val_dataloader())
    base = fitness.hardest_first()
    assert len(base) == fitness.n and _on_device(lm.net)
    assert 0 <= fitness.accuracy(0.5) <= 1
    assert fitness.judge(0.7, fitness.budget(0.5)).seen > 0


@pytest.mark.parametrize("name", list(CONFIGS))
def test_sensitivity_costs(name, lm, calibrated, data, fake_trainer):
    """As the search calls it: after the fitness scored the dense model (on the device)."""
    from sieve_pl.stages.sensitivity import sensitivity_costs

    pruner = _pruner(lm, calibrated, name)
    groups, stats = calibrated
    costs = sensitivity_costs(fake_trainer, lm, pruner, data.calibration_dataloader(), stats,
                              groups, [1.0, 0.5])
    assert set(costs) == set(pruner.names)


@pytest.mark.parametrize("seeds", [["sensitivity"], ["kind"]])
def test_search(seeds, lm, calibrated, data, fake_trainer):
    """The Search stage's calls: uniform bisection, the seed, a short GA."""
    from functools import partial

    from sieve_pl.stages.fitness import Fitness
    from sieve_pl.stages.search import SearchConfig, search
    from sieve_pl.stages.sensitivity import sensitivity_costs

    pruner = _pruner(lm, calibrated)
    groups, stats = calibrated
    config = SearchConfig(epsilon=0.2, population=4, generations=1, seeds=seeds)
    fitness = Fitness(fake_trainer, lm, pruner, data.val_dataloader(), config.early_reject,
                      config.confidence)
    costs = partial(sensitivity_costs, fake_trainer, lm, pruner, data.calibration_dataloader(),
                    stats, groups, config.ladder)
    found = search(fitness, pruner.names, config, None, True, costs)
    assert found.levels.keys() == set(pruner.names) and found.feasible


def test_refit(factored, lm, data, fake_trainer):
    from sieve_pl.stages.refit import refit

    levels = dict.fromkeys(factored.names, 0.5)
    with factored.at(levels):
        got = refit(fake_trainer, lm.net, factored, levels, data.calibration_dataloader())
    assert set(got) == set(factored.names)
    assert all(type(t) is torch.Tensor for ts in got.values() for t in ts)  # for safetensors


def test_distill(factored, lm, data, tmp_path):
    from sieve_pl.stages.distill import DistillConfig, distill, distill_loader

    levels = {n: (0.4 if i % 3 else 1.0) for i, n in enumerate(factored.dense)}
    with factored.at(levels):
        result = distill(fake.fake_trainer, lm.net, factored, levels,
                         distill_loader(data, ["calibration"]), data.val_dataloader(),
                         DistillConfig(enabled=True, epochs=1), tmp_path)
    assert result["factors"] and len(result["val_kl"]) == 1


def test_recover(factored, lm, data, tmp_path):
    from sieve_pl.stages.recover import RecoverConfig, lora_targets, recover

    levels = {n: (0.5 if i % 2 else 1.0) for i, n in enumerate(factored.dense)}
    with factored.at(levels):
        result = recover(fake.fake_trainer, lm.net, data.task,
                         lora_targets(lm.net, lm.adapter.layers), data.train_dataloader(),
                         data.val_dataloader(), RecoverConfig(enabled=True, epochs=1), tmp_path)
    assert result["weights"] and result["best_val_acc"] is not None
    assert all(type(t) is torch.Tensor for t in result["weights"].values())
    assert _on_device(lm.net)  # left as it came


def test_export_reloads_with_the_device_logits(factored, lm, data, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.hf import save_pruned

    batch = next(iter(data.val_dataloader()))
    levels = {n: (0.5 if i % 3 else 1.0) for i, n in enumerate(factored.names)}
    with factored.at(levels), torch.no_grad():
        expected = last_logits(lm.net, {k: v.to(DEVICE) for k, v in batch.items()}).cpu()
        layout = save_pruned(lm.net, tokenizer, tmp_path / "model")
    assert layout["ranks"] and layout["shapes"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model",
                                                    trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(last_logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_evaluate_gives_the_cpu_accuracy(factored, lm, data, fake_trainer, trainer):
    levels = {n: (0.5 if i % 2 else 1.0) for i, n in enumerate(factored.names)}
    with factored.at(levels):
        got = evaluate(fake_trainer, lm, data.val_dataloader())
        lm.net.cpu()
        expected = evaluate(trainer, lm, data.val_dataloader())
    assert got == pytest.approx(expected)
