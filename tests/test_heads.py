"""The attention value-dimension unit (v and o narrowed together per kv head, o refitted)."""
import json

import pytest
import torch

from sieve_pl.models.factored import HeadPad, HeadSlice
from sieve_pl.models.hf import save_pruned
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.units import HeadUnit
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.models.forward import last_logits


@pytest.fixture
def head_setup(tiny_llama, tiny_data, trainer):
    """A tiny Llama (4 heads, 2 kv heads, head_dim 8) with v/o as head units, q/k factored."""
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig(mlp="factored", attention="heads"),
                    attentions=lm.adapter.attentions(lm.net))
    return lm, Pruner(lm.net, bases), tiny_data


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _o_io(net, attn: str, loader):
    """Each batch's o input / output over non-padding tokens, and v's input."""
    rows = {"v": [], "o_in": [], "o_out": []}
    module = net.get_submodule(attn)

    def v_hook(m, args, out):
        rows["v"].append(args[0][mask])

    def o_hook(m, args, out):
        rows["o_in"].append(args[0][mask])
        rows["o_out"].append(out[mask])

    handles = [module.v_proj.register_forward_hook(v_hook),
               module.o_proj.register_forward_hook(o_hook)]
    with torch.no_grad():
        for batch in loader:
            mask = batch["attention_mask"].bool()
            last_logits(net, batch)
    for h in handles:
        h.remove()
    return {k: torch.cat(v) for k, v in rows.items()}


def test_head_units_narrow_v_and_o_with_exact_counts(head_setup):
    lm, pruner, data = head_setup
    batch = next(iter(data.val_dataloader()))
    attns = [n for n in pruner.names if n.endswith(".self_attn")]
    assert len(attns) == 2
    assert not any(n.endswith(("v_proj", "o_proj")) for n in pruner.names)  # one unit per layer
    dense_logits, dense_total = last_logits(lm.net, batch), _params(lm.net)
    levels = {n: (0.5 if n in attns else 1.0) for n in pruner.names}
    assert pruner.apply(levels) == dict.fromkeys(attns, 4)  # 4 of head_dim 8
    attn = lm.net.get_submodule(attns[0])
    assert isinstance(attn.v_proj, HeadPad) and isinstance(attn.o_proj, HeadSlice)
    assert attn.v_proj.linear.out_features == 2 * 4 and attn.o_proj.linear.in_features == 4 * 4
    kept, total = pruner.params(levels)
    assert _params(lm.net) == dense_total - (total - kept)
    assert kept == total - (32 * 16 + 32 * 32) // 2 * 2  # v and o of both layers halved
    assert pruner.sizes({attns[0]: 1e-9}) == {attns[0]: 1}  # never zero dimensions
    pruner.apply(1.0)  # full keep is the dense model, exactly
    assert torch.equal(last_logits(lm.net, batch), dense_logits)
    # o's refit is damped towards the dense o: with every value dimension kept it is the dense o
    unit = pruner.units[attns[0]]
    w_o = unit.dense[unit.o].weight
    assert unit.error(8).abs().max() < 1e-5 * w_o.abs().max()


def test_head_projection_and_refit_beat_truncation_on_held_out_tokens(head_setup):
    lm, pruner, data = head_setup
    attn = next(n for n in pruner.names if n.endswith(".self_attn"))
    dense = _o_io(lm.net, attn, data.val_dataloader())  # tokens the statistics never saw
    errors = {}
    for r in (2, 4, 6):
        pruner.apply({attn: r / 8})
        pruned = _o_io(lm.net, attn, data.val_dataloader())
        errors[r] = (pruned["o_out"] - dense["o_out"]).square().sum() / dense["o_out"].square().sum()
        # the naive cut: keep each head's first r value dimensions, o's columns unchanged
        o = pruner.units[attn].dense[pruner.units[attn].o]
        naive_in = dense["o_in"].unflatten(-1, (4, 8)).clone()
        naive_in[..., r:] = 0
        naive = o(naive_in.flatten(-2))
        naive_err = (naive - dense["o_out"]).square().sum() / dense["o_out"].square().sum()
        assert errors[r] < naive_err
    pruner.apply(1.0)
    assert errors[6] < errors[4] < errors[2] < 1


def test_a_value_dimension_o_never_reads_drops_exactly(make_tiny_llama, tiny_data, trainer):
    """o's columns for value dimension 7 of every head are zero: keeping 7 of 8 loses nothing.

    One query head per kv head: the basis is then the exact optimum (with grouped heads it
    maximises the group's summed statistics, an approximation)."""
    lm = SieveLM(make_tiny_llama("tiny_mha", num_key_value_heads=4))
    lm.load()
    for layer in lm.net.model.layers:
        with torch.no_grad():
            layer.self_attn.o_proj.weight.unflatten(1, (4, 8))[..., 7] = 0
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    config = ProjectionConfig(mlp="factored", attention="heads", ridge=1e-9)
    bases = project(lm.net, groups, stats, config, attentions=lm.adapter.attentions(lm.net))
    pruner = Pruner(lm.net, bases)
    batch = next(iter(tiny_data.val_dataloader()))
    dense_logits = last_logits(lm.net, batch)
    pruner.apply({n: 7 / 8 for n in pruner.names if isinstance(pruner.units[n], HeadUnit)})
    torch.testing.assert_close(last_logits(lm.net, batch), dense_logits, rtol=1e-4, atol=1e-4)


def test_export_with_head_units_reloads_exactly(head_setup, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    lm, pruner, data = head_setup
    batch = next(iter(data.val_dataloader()))
    pruner.apply({n: (0.5 if n.endswith(".self_attn") else 0.7) for n in pruner.names})
    expected = last_logits(lm.net, batch)
    tokenizer(["a b c d e f"], truncation=True, max_length=4, padding="max_length")
    layout = save_pruned(lm.net, tokenizer, tmp_path / "model")
    # the saved tokenizer does not depend on what this process encoded before
    saved = json.loads((tmp_path / "model" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    assert layout["heads"]["model.layers.0.self_attn.v_proj"] == ["pad", 2, 4, 8]
    assert layout["heads"]["model.layers.1.self_attn.o_proj"] == ["slice", 4, 4, 8]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    torch.testing.assert_close(last_logits(reloaded.eval(), batch), expected, rtol=0, atol=0)
    assert _params(reloaded) == _params(lm.net)
    pruner.apply(1.0)
