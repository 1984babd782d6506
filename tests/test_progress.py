"""Named progress bars: every prediction loop says what it is for."""
import lightning as L

from sieve_pl.cli import SieveCLI
from sieve_pl.models.module import SieveLM, evaluate
from sieve_pl.progress import StageBar


def test_prediction_loops_carry_their_stage_name(tiny_llama, tiny_data):
    seen = []

    class Spy(L.Callback):
        def on_predict_start(self, trainer, module):
            seen.append(trainer.progress_bar_callback.predict_description)

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, callbacks=[StageBar(), Spy()],
                        enable_model_summary=False)
    lm = SieveLM(tiny_llama)
    lm.load()
    lm.set_task(tiny_data.task)
    evaluate(trainer, lm, tiny_data.val_dataloader(), "evaluate pruned/test")
    assert seen == ["evaluate pruned/test"]
    assert trainer.progress_bar_callback.stage == "Predicting"  # restored after the loop


def test_cli_installs_the_named_bar_only_when_bars_are_on(tiny_llama):
    cli = SieveCLI(args=["--model.pretrained", tiny_llama], run=False)
    assert isinstance(cli.trainer.progress_bar_callback, StageBar)
    cli = SieveCLI(args=["--model.pretrained", tiny_llama, "--trainer.enable_progress_bar",
                         "false"], run=False)
    assert cli.trainer.progress_bar_callback is None


def test_a_saved_run_config_reloads_with_bars_off(tiny_llama, tmp_path):
    """The measuring subprocesses load the run's config.yaml (which lists the StageBar the CLI
    added) with ``--trainer.enable_progress_bar false``: no bar, no conflict."""
    cli = SieveCLI(args=["--model.pretrained", tiny_llama], run=False)
    saved = tmp_path / "config.yaml"
    cli.parser.save(cli.config, saved, skip_none=False, overwrite=True)
    assert "sieve_pl.progress.StageBar" in saved.read_text()
    again = SieveCLI(args=["--config", str(saved), "--trainer.enable_progress_bar", "false"],
                     command="test", run=False)
    assert again.trainer.progress_bar_callback is None
    bars = SieveCLI(args=["--config", str(saved)], command="test", run=False)
    assert sum(isinstance(c, StageBar) for c in bars.trainer.callbacks) == 1


def test_bars_off_silences_sieve_pls_own_bars_too(tiny_llama, tmp_path, capfd):
    """``--trainer.enable_progress_bar false`` (logs, CI): no bar from the search's candidates,
    the projection or the GA either."""
    import datasets
    import transformers

    from sieve_pl.cli import main

    try:
        main(["fit", "--model.pretrained", tiny_llama, "--run.root", str(tmp_path),
              "--data.sizes", "{calibration: 8, validation: 8, test: 4, train: 0}",
              "--data.batch_size", "4", "--search.population", "3", "--search.generations", "1",
              "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary",
              "false"])
    finally:  # (process-wide switches: later tests get their bars back)
        transformers.utils.logging.enable_progress_bar()
        datasets.enable_progress_bars()
    err = capfd.readouterr().err
    for bar in ("search: base model", "search: uniform", "project (", "search (genetic)", "it/s]",
                "example/s]"):
        assert bar not in err
