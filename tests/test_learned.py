"""Learned projections: the nested loss, convergence to the closed form, exact resume."""
from __future__ import annotations

import lightning as L
import pytest
import torch

from sieve_pl.models.factored import dense_weight
from sieve_pl.models.module import SieveLM
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.learned import LearnedConfig, nested_error
from sieve_pl.stages.project import ProjectionConfig, project
from sieve_pl.units import max_rank


def test_nested_error_is_the_sum_of_every_prefix_rank_error():
    g = torch.Generator().manual_seed(0)
    y, x = torch.randn(50, 7, generator=g, dtype=torch.float64), torch.randn(50, 6, generator=g,
                                                                             dtype=torch.float64)
    a, b = torch.randn(4, 6, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g,
                                                                            dtype=torch.float64)
    direct = sum(((y - x @ a[:r].T @ b[:, :r].T) ** 2).sum() for r in range(1, 5))
    torch.testing.assert_close(nested_error(y, x @ a.T, b), direct)


@pytest.fixture(scope="module")
def calibrated(tiny_llama, tokenizer):
    from sieve_pl.tasks import SplitSizes, TaskDataModule

    data = TaskDataModule(sizes=SplitSizes(calibration=12, validation=8, test=8), batch_size=5)
    data.prepare(tokenizer)
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, enable_checkpointing=False)
    stats = calibrate(trainer, lm.net, groups, data.calibration_dataloader(), CalibrationConfig())
    return lm.net, groups, stats, data


def make_trainer(*callbacks):
    def make(**kwargs):
        return L.Trainer(accelerator="cpu", devices=1, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=list(callbacks), **kwargs)
    return make


def _learn(calibrated, work, *callbacks, **options):
    net, groups, stats, data = calibrated
    config = ProjectionConfig(method="learned", learned=LearnedConfig(**options))
    return project(net, groups, stats, config, make_trainer(*callbacks),
                   data.calibration_dataloader(), work)


def _errors(calibrated, bases) -> dict[str, list[float]]:
    """Every matrix's ``Σ ‖Wx − B_r A_r x‖²`` over the calibration tokens, at ranks 1..K
    (exact on those tokens: ``tr((W − M) C (W − M)ᵀ)`` with ``C = Σ xxᵀ``)."""
    net, groups, stats, _ = calibrated
    errors = {}
    for key, names in groups.items():
        c = stats[key].double()
        for name in names:
            w = dense_weight(net.get_submodule(name)).detach().double()
            basis = bases[name]
            errors[name] = []
            for r in range(1, max_rank(*w.shape) + 1):  # every basis reaches that rank
                a, b = basis.pair(r, w)
                d = w - b @ a
                errors[name].append(float(((d @ c) * d).sum()))
    return errors


def test_learned_from_random_approaches_the_closed_form_and_never_beats_it(calibrated, tmp_path):
    net, groups, stats, _ = calibrated
    best = _errors(calibrated, project(net, groups, stats, ProjectionConfig()))
    learned = _learn(calibrated, tmp_path, epochs=60, lr=0.3)
    got = _errors(calibrated, learned)
    for name, optimum in best.items():
        assert learned[name].a.shape == (len(optimum), net.get_submodule(name).in_features)
        # the closed form is optimal at every rank on these tokens: no learned rank is better
        assert all(g >= o * (1 - 1e-6) - 1e-9 for g, o in zip(got[name], optimum))
    # close to the optimum at the middle rank (summed over matrices: a few nearly-degenerate
    # o_proj tails converge slowly, as gradient descent does on ill-conditioned inputs)
    middle = {name: len(optimum) // 2 - 1 for name, optimum in best.items()}
    ratio = sum(got[n][r] for n, r in middle.items()) / sum(best[n][r] for n, r in middle.items())
    print(f"learned / closed-form error at rank K/2, all matrices: {ratio:.4f}")
    assert ratio < 1.05, ratio


def test_closed_form_start_stays_at_the_optimum(calibrated, tmp_path):
    net, groups, stats, _ = calibrated
    best = _errors(calibrated, project(net, groups, stats, ProjectionConfig()))
    got = _errors(calibrated, _learn(calibrated, tmp_path, init="closed_form", epochs=2,
                                     lr=1e-3))
    total = {n: sum(e) for n, e in best.items()}
    assert all(sum(got[n]) <= 1.01 * t + 1e-9 for n, t in total.items())


class Killed(Exception):
    pass


class KillAt(L.Callback):
    """Raises at a step of the n-th fit it sees (one fit per part of the learned projection)."""

    def __init__(self, fit: int, step: int):
        self.fit, self.step, self.fits = fit, step, -1

    def on_fit_start(self, trainer, module):
        self.fits += 1

    def on_train_batch_start(self, trainer, *args):
        if self.fits == self.fit and trainer.global_step == self.step:
            raise Killed


def test_resume_from_last_ckpt_equals_uninterrupted(calibrated, tmp_path):
    options = dict(epochs=3, lr=0.3, layers_per_fit=1)  # one fit per layer: two parts
    full = _learn(calibrated, tmp_path / "a", **options)
    steps_per_epoch = len(calibrated[3].calibration_dataloader())
    with pytest.raises(Killed):  # second part, middle of its second epoch
        _learn(calibrated, tmp_path / "b", KillAt(fit=1, step=steps_per_epoch + 1), **options)
    assert (tmp_path / "b" / "part-0.safetensors").exists()
    assert (tmp_path / "b" / "part-1" / "last.ckpt").exists()
    state = torch.load(tmp_path / "b" / "part-1" / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(k.startswith(("A.", "B.")) for k in state)  # factors only
    resumed = _learn(calibrated, tmp_path / "b", **options)
    assert resumed.keys() == full.keys()
    for name in full:
        torch.testing.assert_close(resumed[name].a, full[name].a, rtol=0, atol=0)
        torch.testing.assert_close(resumed[name].b, full[name].b, rtol=0, atol=0)


def test_learned_needs_a_trainer(calibrated):
    from sieve_pl.errors import SieveError

    net, groups, stats, _ = calibrated
    with pytest.raises(SieveError, match="learned"):
        project(net, groups, stats, ProjectionConfig(method="learned"))


def test_options_parse_from_the_command_line():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ProjectionConfig, "projection")
    cfg = parser.parse_args(["--projection.method", "learned", "--projection.learned.lr", "0.1",
                             "--projection.learned.init", "closed_form"])
    config = parser.instantiate_classes(cfg).projection
    assert config.method == "learned" and config.learned.lr == 0.1
    assert config.learned.init == "closed_form"
