import os
import subprocess
import sys

import pytest
import torch

from sieve_pl.models.factored import FactoredLinear
from sieve_pl.models.hf import save_pruned
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.units import matrix_params, max_rank, rank_for
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.models.forward import last_logits


def _pruner(tiny_llama, data, trainer, neurons: bool):
    """A tiny Llama, calibrated, with every matrix factored (or its MLPs as neuron units)."""
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(),
                      CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig(),
                    mlps=lm.adapter.mlps(lm.net) if neurons else None)
    return lm, Pruner(lm.net, bases), stats


@pytest.fixture
def pruned_setup(tiny_llama, tiny_data, trainer):
    lm, pruner, _ = _pruner(tiny_llama, tiny_data, trainer, neurons=False)
    return lm, pruner, next(iter(tiny_data.val_dataloader()))


def _params(model):
    return sum(p.numel() for p in model.parameters())


def test_rank_rule():
    assert rank_for(1.0, 48, 32) is None
    assert rank_for(0.5, 48, 32) == int(0.5 * 48 * 32 / 80)
    assert rank_for(1e-6, 48, 32) == 1
    assert rank_for(0.5, 48, 32, multiple=4) == 8 and rank_for(0.01, 48, 32, multiple=4) == 4
    assert rank_for(0.5, 48, 32, multiple=32) is None  # max rank 19 < 32: stays dense
    r = rank_for(0.999, 48, 32)
    assert r <= max_rank(48, 32) and matrix_params(48, 32, r) <= 48 * 32


def test_keep_one_reproduces_logits_and_counts_are_exact(pruned_setup):
    lm, pruner, batch = pruned_setup
    dense_logits = last_logits(lm.net, batch)
    dense_total = _params(lm.net)
    for keep in (0.3, 0.8, {n: (0.4 if i % 2 else 1.0) for i, n in enumerate(pruner.dense)}):
        ranks = pruner.apply(keep)
        assert ranks and all(isinstance(lm.net.get_submodule(n), FactoredLinear) for n in ranks)
        kept, total = pruner.params(keep)
        assert kept < total
        assert _params(lm.net) == dense_total - (total - kept)  # exact accounting
        assert not torch.allclose(last_logits(lm.net, batch), dense_logits)
    assert pruner.apply(1.0) == {}
    assert torch.equal(last_logits(lm.net, batch), dense_logits)
    assert _params(lm.net) == dense_total


def test_export_reloads_with_identical_logits_and_never_loads_as_the_base_model(
        pruned_setup, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from sieve_pl.models.loading import load_model

    lm, pruner, batch = pruned_setup
    levels = {n: (0.5 if i % 3 else 1.0) for i, n in enumerate(pruner.names)}
    sizes = pruner.apply(levels)
    expected = last_logits(lm.net, batch)
    layout = save_pruned(lm.net, tokenizer, tmp_path / "model")
    assert layout["ranks"] == {n: r for n, r in sizes.items() if n in pruner.dense}
    assert lm.net.config.model_type == "llama"  # in-memory config untouched
    # never as a plain Llama: plain transformers (a fresh process, where sieve_pl registered
    # nothing) refuses it without trust_remote_code
    plain = subprocess.run([sys.executable, "-c", "import sys; from transformers import "
                            "AutoModelForCausalLM; AutoModelForCausalLM.from_pretrained(sys.argv[1])",
                            str(tmp_path / "model")], capture_output=True, text=True,
                           env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert plain.returncode != 0 and "trust_remote_code" in plain.stderr
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(reloaded).__name__ == "SieveLlamaForCausalLM"
    assert reloaded.config.sieve["ranks"] == layout["ranks"]
    assert _params(reloaded) == _params(lm.net)
    torch.testing.assert_close(last_logits(reloaded.eval(), batch), expected, rtol=0, atol=0)
    own, _ = load_model(str(tmp_path / "model"))  # sieve_pl's own classes, no folder code
    assert type(own).__module__.startswith("sieve_pl")
    torch.testing.assert_close(last_logits(own, batch), expected, rtol=0, atol=0)
    pruner.apply(1.0)


@pytest.fixture
def neuron_setup(tiny_llama, tiny_data, trainer):
    """A tiny Llama with its MLPs as neuron units."""
    return (*_pruner(tiny_llama, tiny_data, trainer, neurons=True), tiny_data)


def _mlp_io(net, mlp: str, loader):
    """Inputs and outputs of one MLP over a loader's non-padding tokens."""
    xs, ys = [], []
    module = net.get_submodule(mlp)

    def hook(m, args, out):
        xs.append(args[0][mask])
        ys.append(out[mask])

    handle = module.register_forward_hook(hook)
    with torch.no_grad():
        for batch in loader:
            mask = batch["attention_mask"].bool()
            last_logits(net, batch)
    handle.remove()
    return torch.cat(xs), torch.cat(ys)


def test_neuron_units_shrink_the_mlp_with_exact_counts(neuron_setup):
    lm, pruner, _, data = neuron_setup
    batch = next(iter(data.val_dataloader()))
    mlps = [n for n in pruner.names if n.endswith(".mlp")]
    assert len(mlps) == 2 and not any("mlp." in n for n in pruner.names)  # one unit per MLP
    dense_logits, dense_total = last_logits(lm.net, batch), _params(lm.net)
    inner = lm.net.config.intermediate_size
    sizes = pruner.apply({n: (0.5 if n in mlps else 1.0) for n in pruner.names})
    assert sizes == dict.fromkeys(mlps, inner // 2)
    mlp = lm.net.get_submodule(mlps[0])
    assert type(mlp.down_proj) is torch.nn.Linear and mlp.down_proj.in_features == inner // 2
    assert mlp.gate_proj.out_features == mlp.up_proj.out_features == inner // 2
    kept, total = pruner.params({n: (0.5 if n in mlps else 1.0) for n in pruner.names})
    assert _params(lm.net) == dense_total - (total - kept)
    assert pruner.sizes({mlps[0]: 1e-9}) == {mlps[0]: 1}  # never zero neurons
    pruner.apply(1.0)  # full keep is the dense model, exactly
    assert torch.equal(last_logits(lm.net, batch), dense_logits)


def test_refit_of_down_reduces_the_output_error_on_held_out_tokens(neuron_setup):
    lm, pruner, _, data = neuron_setup
    mlp = next(n for n in pruner.names if n.endswith(".mlp"))
    basis = pruner.units[mlp].basis
    x, y = _mlp_io(lm.net, mlp, data.val_dataloader())  # tokens the statistics never saw
    module = lm.net.get_submodule(mlp)
    hidden = torch.nn.functional.silu(module.gate_proj(x)) * module.up_proj(x)
    w = module.down_proj.weight.detach()
    for k in (8, 24, 40):
        kept = basis.order[:k]
        selected = hidden[:, kept] @ w[:, kept].T  # neurons dropped, down not refitted
        refit = hidden[:, kept] @ basis.refit(k).T
        assert (refit - y).square().sum() < (selected - y).square().sum()


def test_prefix_refit_is_the_ridge_least_squares_and_a_dead_neuron_drops_exactly():
    """The refit is damped towards the dense weights, so keeping every neuron gives down's
    weights back exactly whatever the ridge (damping towards zero shrank them)."""
    from sieve_pl.units import neuron_basis

    g = torch.Generator().manual_seed(0)
    h, inner, n = 12, 20, 400
    hidden = torch.randn(n, inner, generator=g, dtype=torch.float64) @ torch.randn(
        inner, inner, generator=g, dtype=torch.float64)
    w = torch.randn(h, inner, generator=g, dtype=torch.float64)
    w[:, 7] = 0  # neuron 7 feeds nothing downstream
    c = hidden.T @ hidden / n
    for how in ("greedy", "magnitude"):
        basis = neuron_basis(w, c, 1e-3, how)
        assert sorted(basis.order.tolist()) == list(range(inner))
        c_lam = c + 1e-3 * c.diagonal().mean() * torch.eye(inner, dtype=c.dtype)
        for k in (1, 5, 13, inner):
            s = basis.order[:k]
            expected = w @ c_lam[:, s] @ torch.linalg.inv(c_lam[s][:, s])
            torch.testing.assert_close(basis.refit(k).double(), expected, rtol=1e-5, atol=1e-6)
        basis = neuron_basis(w, c, 10.0, how)  # strong damping: still exact at I
        torch.testing.assert_close(basis.refit(inner).double(), w[:, basis.order],
                                   rtol=1e-5, atol=1e-6)
    basis = neuron_basis(w, c, 1e-12, "magnitude")
    assert int(basis.order[-1]) == 7
    refit = basis.refit(inner - 1).double()
    torch.testing.assert_close(hidden[:, basis.order[:-1]] @ refit.T, hidden @ w.T,
                               rtol=1e-4, atol=1e-4)


def test_greedy_order_beats_magnitude_on_the_fitted_error():
    from sieve_pl.units import neuron_basis

    g = torch.Generator().manual_seed(1)
    h, inner, n = 16, 48, 600
    mix = torch.randn(inner, inner, generator=g, dtype=torch.float64)
    hidden = torch.randn(n, inner, generator=g, dtype=torch.float64) @ mix
    w = torch.randn(h, inner, generator=g, dtype=torch.float64)
    c = hidden.T @ hidden / n

    def errors(how):
        basis = neuron_basis(w, c, 1e-6, how)
        return [float((hidden[:, basis.order[:k]] @ basis.refit(k).double().T
                       - hidden @ w.T).square().sum()) for k in range(4, inner, 4)]

    greedy, magnitude = errors("greedy"), errors("magnitude")
    assert sum(greedy) < sum(magnitude)
    assert all(a <= b * 1.05 for a, b in zip(greedy, magnitude))


def test_export_with_resized_mlps_reloads_exactly(neuron_setup, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    lm, pruner, _, data = neuron_setup
    batch = next(iter(data.val_dataloader()))
    levels = {n: (0.5 if n.endswith(".mlp") else 0.7) for n in pruner.names}
    pruner.apply(levels)
    expected = last_logits(lm.net, batch)
    layout = save_pruned(lm.net, tokenizer, tmp_path / "model")
    inner = lm.net.config.intermediate_size
    assert layout["shapes"]["model.layers.0.mlp.down_proj"] == [32, inner // 2]
    assert layout["shapes"]["model.layers.1.mlp.gate_proj"] == [inner // 2, 32]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    torch.testing.assert_close(last_logits(reloaded.eval(), batch), expected, rtol=0, atol=0)
    assert _params(reloaded) == _params(lm.net)
    pruner.apply(1.0)


def test_at_restores_the_levels_and_weights_the_model_had(pruned_setup):
    lm, pruner, batch = pruned_setup
    pruner.apply(0.5)
    before = last_logits(lm.net, batch)
    name = "model.layers.0.mlp.gate_proj.weight"  # a parameter of the dense model
    with pruner.at(1.0, {name: torch.zeros(lm.net.config.intermediate_size, 32)}):
        assert pruner.sizes(pruner.keep) == {}  # dense inside
        assert not torch.equal(last_logits(lm.net, batch), before)
    assert pruner.keep == 0.5
    torch.testing.assert_close(last_logits(lm.net, batch), before, rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        with pruner.at(0.3):
            raise RuntimeError("a failing stage")
    assert pruner.keep == 0.5  # restored on errors too
    pruner.apply(1.0)


def every_kind_projected(tiny_llama, tiny_data, trainer):
    """The tiny model loaded, calibrated and projected with all three unit kinds."""
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    return lm, project(lm.net, groups, stats, ProjectionConfig(mlp="neurons", attention="heads"),
                       mlps=lm.adapter.mlps(lm.net), attentions=lm.adapter.attentions(lm.net))


def test_parked_dense_weights_leave_memory_and_come_back_exactly(tiny_llama, tiny_data, trainer,
                                                                  tmp_path):
    """Every unit kind: while pruned, its dense Linears hold one element each (their weights
    wait in the park folder); candidates, errors, going back to dense and ``dense`` itself
    see exactly the weights they would have seen unparked."""
    lm, bases = every_kind_projected(tiny_llama, tiny_data, trainer)
    batch = next(iter(tiny_data.val_dataloader()))
    dense = {k: v.clone() for k, v in lm.net.state_dict().items()}
    reference = {}
    plain = Pruner(lm.net, bases)
    for keep in (0.5, 0.7):
        plain.apply(keep)
        reference[keep] = last_logits(lm.net, batch)
    errors = {n: u.error(u.size(0.5, 1)) for n, u in plain.units.items()}
    plain.apply(1.0)
    assert {type(u).kind for u in plain.units.values()} == {"matrix", "neurons", "heads"}

    pruner = Pruner(lm.net, bases, park=tmp_path)
    for keep in (0.5, 0.7):  # a rebuild at another size reads the parked weights back
        pruner.apply(keep)
        torch.testing.assert_close(last_logits(lm.net, batch), reference[keep], rtol=0, atol=0)
        for unit in pruner.units.values():
            assert unit.parked is not None
            for module in unit._dense.values():
                assert module.weight.untyped_storage().nbytes() == module.weight.element_size()
    assert sorted(p.stem for p in tmp_path.glob("*.safetensors")) == sorted(pruner.units)
    for name, unit in pruner.units.items():  # read with the model pruned: weights come back
        torch.testing.assert_close(unit.error(unit.size(0.5, 1)), errors[name], rtol=0, atol=0)
        assert unit.parked is None
    pruner.apply(0.5)
    assert all(u.parked is not None for u in pruner.units.values())
    pruner.apply(1.0)
    assert all(u.parked is None for u in pruner.units.values())
    for key, value in lm.net.state_dict().items():
        assert torch.equal(value, dense[key]), key


def test_a_units_old_pruned_modules_are_freed_before_its_next_are_built(tiny_llama, tiny_data,
                                                                         trainer):
    """Moving a unit to another size, its previous pruned modules leave the model (and memory,
    by reference counting) before the new ones are built: host memory holds one pruned copy
    of a unit, not two, beside the dense weights read back."""
    import gc
    import weakref

    lm, bases = every_kind_projected(tiny_llama, tiny_data, trainer)
    pruner = Pruner(lm.net, bases)
    pruner.apply(0.4)
    old = {n: weakref.ref(lm.net.get_submodule(n)) for unit in pruner.units.values()
           for n in unit.resting()}
    alive_at_build = {}
    for name, unit in pruner.units.items():
        def modules(size, refitted, device, unit=unit, build=unit.modules, name=name):
            alive_at_build[name] = [n for n in unit.resting() if old[n]() is not None]
            return build(size, refitted, device)
        unit.modules = modules
    gc.disable()
    try:
        pruner.apply(0.8)
    finally:
        gc.enable()
    assert len(alive_at_build) >= len(pruner.units) // 2
    assert not any(alive_at_build.values()), alive_at_build


def test_loaded_weights_live_in_process_memory_not_the_checkpoint_map(make_tiny_llama):
    """``load_model`` copies every weight out of the checkpoint's memory map (a dropped weight
    then really frees memory) and hands the map's pages back: the values are the file's, ties
    are kept, and no parameter points into a mapping of the file any more."""
    from pathlib import Path

    from safetensors.torch import load_file

    from transformers import AutoModelForCausalLM

    from sieve_pl.models.loading import _file_mappings, into_process_memory, load_model

    def in_map(net):
        mapped = _file_mappings()
        return {n for n, p in net.named_parameters()
                if any(lo <= p.data_ptr() < hi for lo, hi in mapped)}

    path = make_tiny_llama("tiny_llama_mapped", tie_word_embeddings=False)
    plain = AutoModelForCausalLM.from_pretrained(path)  # transformers' own load: the map
    names = {n for n, _ in plain.named_parameters()}
    assert in_map(plain) == names
    assert into_process_memory(plain) == sum(p.numel() * 4 for p in plain.parameters())
    assert not in_map(plain)
    net, _ = load_model(path)
    on_disk = load_file(str(Path(path) / "model.safetensors"))
    for name, p in [*net.named_parameters(), *plain.named_parameters()]:
        assert torch.equal(p.detach(), on_disk[name]), name
    assert not in_map(net)
    tied, _ = load_model(make_tiny_llama("tiny_llama_tied"))
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
