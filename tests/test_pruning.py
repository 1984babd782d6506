import pytest
import torch

from sieve_pl.models.factored import FactoredLinear
from sieve_pl.models.hf import save_pruned
from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner, matrix_params, max_rank, rank_for
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.tasks.base import last_logits


@pytest.fixture
def pruned_setup(tiny_llama, tiny_data, trainer):
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    bases = project(lm.net, groups, stats, ProjectionConfig())
    batch = next(iter(tiny_data.val_dataloader()))
    return lm, Pruner(lm.net, bases), batch


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


def test_export_reloads_with_identical_logits(pruned_setup, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    lm, pruner, batch = pruned_setup
    levels = {n: (0.5 if i % 3 else 1.0) for i, n in enumerate(pruner.dense)}
    ranks = pruner.apply(levels)
    expected = last_logits(lm.net, batch)
    save_pruned(lm.net, tokenizer, ranks, tmp_path / "model")
    assert not hasattr(lm.net.config, "sieve_ranks")  # in-memory config untouched
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(reloaded).__name__ == "SieveForCausalLM"
    assert reloaded.config.sieve_ranks == ranks
    assert _params(reloaded) == _params(lm.net)
    torch.testing.assert_close(last_logits(reloaded.eval(), batch), expected, rtol=0, atol=0)
