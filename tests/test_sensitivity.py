"""The sensitivity seed: each unit's output change, the K-FAC costs, the price path, its bisection."""
import pytest
import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.stages.fitness import Verdict
from sieve_pl.stages.search import SearchConfig, path_search
from sieve_pl.stages.stage import levels_at
from sieve_pl.stages.sensitivity import (gradient_moments, price_path,
                                         sensitivity_costs)
from sieve_pl.models.forward import last_logits


@pytest.fixture
def units(tiny_llama, tiny_data, trainer):
    """A tiny Llama with every kind of unit: q/k factored, v/o heads, MLP neurons."""
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(tiny_data.task)
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig(mlp="neurons", attention="heads"),
                    mlps=lm.adapter.mlps(lm.net), attentions=lm.adapter.attentions(lm.net))
    return lm, Pruner(lm.net, bases), stats, groups


def _output_io(net, name, batch):
    """Input and output of one Linear over a batch's tokens."""
    seen = {}

    def hook(module, args, out):
        seen["x"], seen["y"] = args[0].detach().clone(), out.detach().clone()

    handle = net.get_submodule(name).register_forward_hook(hook)
    with torch.no_grad():
        last_logits(net, batch)
    handle.remove()
    return seen["x"], seen["y"]


def test_error_is_the_change_of_the_units_output(units, tiny_data):
    """For every kind of unit in the first layer (its inputs are the dense ones whatever the
    level): dense output − pruned output = ΔW · dense input."""
    lm, pruner, _, _ = units
    batch = next(iter(tiny_data.val_dataloader()))
    first = [n for n in pruner.names if ".0." in n]
    kinds = {type(pruner.units[n]).__name__ for n in first}
    assert kinds == {"MatrixUnit", "NeuronUnit", "HeadUnit"}
    for name in first:
        unit = pruner.units[name]
        x, dense = _output_io(lm.net, unit.output, batch)
        size = unit.size(0.5, 1)
        with pruner.at({name: 0.5}):
            _, pruned = _output_io(lm.net, unit.output, batch)
        predicted = x @ unit.error(size).T
        assert predicted.abs().max() > 1e-4, name  # the cut changes something
        torch.testing.assert_close(dense - pruned, predicted, atol=2e-5, rtol=1e-3,
                                   msg=f"{name}: ΔW does not give the output change")


def test_gradient_moments_match_plain_backward(units, tiny_data, trainer):
    lm, pruner, _, _ = units
    outputs = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]
    loader = tiny_data.calibration_dataloader()
    got = gradient_moments(trainer, lm.net, lm.task, outputs, loader)
    # reference: retain the outputs' grads through an ordinary backward
    sums, tokens, kept = {n: 0 for n in outputs}, 0, {}

    def keep(name):
        def hook(module, args, out):
            out.retain_grad()
            kept[name] = out
        return hook

    handles = [lm.net.get_submodule(n).register_forward_hook(keep(n)) for n in outputs]
    for batch in loader:
        (lm.task.loss(lm.net, batch) * len(batch["input_ids"])).backward()
        for n in outputs:
            g = kept[n].grad.flatten(0, -2).double()
            sums[n] = sums[n] + g.T @ g
        tokens += int(batch["attention_mask"].sum())
    for h in handles:
        h.remove()
    lm.net.zero_grad(set_to_none=True)
    for n in outputs:
        assert got[n].abs().max() > 0 and got[n].dtype == torch.float32
        torch.testing.assert_close(got[n].double(), sums[n] / tokens, rtol=1e-4,
                                   atol=1e-5 * float(got[n].abs().max()))  # float32 sums
    assert all(p.grad is None for p in lm.net.parameters())  # no weight gradients
    assert all(p.requires_grad for p in lm.net.parameters())  # frozen only meanwhile
    # activations recomputed in the backward pass: the same moments
    again = gradient_moments(trainer, lm.net, lm.task, outputs, loader, checkpointing=True)
    for n in outputs:
        torch.testing.assert_close(again[n], got[n], rtol=1e-4, atol=1e-10)
    assert not lm.net.is_gradient_checkpointing and not lm.net.training


def test_model_fisher_is_the_expectation_over_the_models_own_answers(units, tiny_data, trainer):
    """``fisher="model"``: Σ_a p_a g_a g_aᵀ, g_a the output gradient of log p_a (the labels
    are not read)."""
    lm, _, _, _ = units
    outputs = ["model.layers.1.mlp.down_proj"]
    loader = tiny_data.calibration_dataloader()
    got = gradient_moments(trainer, lm.net, lm.task, outputs, loader, fisher="model")
    total, tokens, kept = 0, 0, {}
    def keep(module, args, out):
        out.retain_grad()
        kept["out"] = out
    handle = lm.net.get_submodule(outputs[0]).register_forward_hook(keep)
    for batch in loader:
        classes = lm.task.answer_logprobs(lm.net, batch).shape[1]
        for a in range(classes):
            logp = lm.task.answer_logprobs(lm.net, batch)
            p = logp[:, a].detach().exp()
            (-(p.sqrt() * logp[:, a]).sum()).backward()
            g = kept["out"].grad.flatten(0, -2).double()
            total = total + g.T @ g
        tokens += int(batch["attention_mask"].sum())
    handle.remove()
    lm.net.zero_grad(set_to_none=True)
    torch.testing.assert_close(got[outputs[0]].double(), total / tokens, rtol=1e-4,
                               atol=1e-5 * float(total.abs().max() / tokens))


def test_costs_are_zero_dense_and_grow_with_the_cut(units, tiny_data, trainer):
    lm, pruner, stats, groups = units
    ladder = [1.0, 0.75, 0.5, 0.25]
    costs = sensitivity_costs(trainer, lm, pruner, tiny_data.calibration_dataloader(), stats,
                              groups, ladder)
    assert set(costs) == set(pruner.names)
    for name, points in costs.items():
        assert points[0] == {"keep": 1.0, "params": pruner.units[name].total, "cost": 0.0}
        assert all(p["cost"] >= 0 for p in points), name
        assert points[-1]["cost"] > 0, name
        assert [p["params"] for p in points] == sorted((p["params"] for p in points),
                                                       reverse=True)


def _points(*pairs):
    return [{"keep": k, "params": p, "cost": c} for k, p, c in pairs]


def test_price_path_merges_convex_hulls_cheapest_first():
    costs = {"a": _points((1.0, 100, 0.0), (0.5, 50, 1.0), (0.25, 25, 10.0)),
             # 0.5 lies above the hull from dense to 0.25: never the cheapest buy
             "b": _points((1.0, 100, 0.0), (0.5, 50, 4.0), (0.25, 25, 5.0))}
    path = price_path(costs)
    assert path == [("a", 0.5, 50), ("b", 0.25, 75), ("a", 0.25, 25)]
    assert levels_at(path, ["a", "b"], 2) == {"a": 0.5, "b": 0.25}
    assert levels_at(path, ["a", "b"], 0) == {"a": 1.0, "b": 1.0}


def test_path_search_finds_the_longest_feasible_prefix():
    names = [f"u{i}" for i in range(40)]
    path = [(n, 0.5, 10) for n in names]  # 40 steps of 10 weights, 400 in all
    seen = []

    def judge(levels):
        removed = sum(10 for v in levels.values() if v < 1)
        seen.append(removed)
        return Verdict(removed <= 230, None if removed <= 230 else 0, 0, 1 - removed / 1000)

    found = path_search(judge, path, names, 400, 1.0, SearchConfig(resolution=0.01))
    assert found["steps"] == 23
    assert sum(v < 1 for v in found["levels"].values()) == 23
    assert found["accuracy"] == pytest.approx(0.77)
    assert len(seen) <= 8  # a bisection, not a scan
