"""Bad input and bad luck: one clear line, raised before heavy work, nothing half-written kept."""
from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from sieve_pl.cli import SieveCLI, main
from sieve_pl.errors import SieveError
from sieve_pl.io import write_json
from sieve_pl.pipeline import RunDir

DEMO = str(Path(__file__).parents[1] / "configs" / "demo.yaml")


def run_cli(*args) -> int:
    try:
        main(list(args))
    except SystemExit as exit_:
        return exit_.code
    return 0


def last_error_line(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("ladder", ["[1.0, 0.5, 0.0]", "[1.2, 0.5]", "[]"])
def test_keep_ladder_outside_unit_interval(tmp_path, capsys, ladder):
    assert run_cli("fit", "--config", DEMO, "--run.root", str(tmp_path),
                   "--search.ladder", ladder) == 2
    assert "search.ladder values must be in (0, 1]" in last_error_line(capsys)


@pytest.mark.parametrize("sizes,message", [
    ("{calibration: 0, validation: 10, test: 10, train: 8}", "fit needs calibration and validation"),
    ("{calibration: 10, validation: 10, test: 0, train: 8}", "test >= 1"),
])
def test_empty_split(tmp_path, capsys, sizes, message):
    assert run_cli("fit", "--config", DEMO, "--run.root", str(tmp_path), "--data.sizes",
                   sizes) == 2
    assert message in last_error_line(capsys)


def test_label_word_outside_the_vocabulary(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from sieve_pl.tasks.classification import label_word_tokens

    words = Tokenizer(models.WordLevel({"[UNK]": 0, "positive": 1, "negative": 2}, "[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]")
    assert label_word_tokens(tokenizer, {"a": "positive", "b": "negative"}) == [[1], [2]]
    with pytest.raises(SieveError, match="'négatif' .* is not in the model's vocabulary"):
        label_word_tokens(tokenizer, {"a": "positive", "b": "négatif"})


def test_config_key_typo_is_named_by_lightning_cli(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "--config", DEMO, "--search.epsilonn", "0.1"])
    assert exit_.value.code != 0
    assert "epsilonn" in capsys.readouterr().err


def _foreign_run(root: Path) -> Path:
    """A run folder whose calibration was made by another model / other data."""
    marker = root / "demo" / "calibrate" / "stage.json"
    marker.parent.mkdir(parents=True)
    write_json(marker, {"fingerprint": "another-run", "config": {}, "seconds": 1.0})
    (root / "demo" / "config.yaml").write_text("# the other run's config\n")
    return root / "demo"


def test_run_dir_of_another_run_is_refused_and_left_alone(tmp_path, capsys):
    run = _foreign_run(tmp_path)
    assert run_cli("fit", "--config", DEMO, "--run.root", str(tmp_path)) == 2
    assert "holds another run" in last_error_line(capsys)
    assert (run / "config.yaml").read_text() == "# the other run's config\n"


def test_overwrite_lets_a_run_take_the_folder(tmp_path):
    _foreign_run(tmp_path)
    cli = SieveCLI(args=["--config", DEMO, "--run.root", str(tmp_path), "--run.overwrite", "true"],
                   run=False)
    pipeline = cli.pipeline()
    pipeline.prepare()
    pipeline.check_run_dir()  # no error


def test_non_finite_calibration_statistics_name_the_matrices(tiny_llama, tiny_data, trainer):
    from sieve_pl.models.module import SieveLM
    from sieve_pl.stages.calibrate import CalibrationConfig, calibrate

    lm = SieveLM(tiny_llama)
    lm.load()
    with torch.no_grad():  # an activation overflow, as fp16 models can have
        lm.net.model.layers[1].mlp.up_proj.weight.fill_(float("inf"))
    groups = lm.adapter.input_groups(lm.net)
    with pytest.raises(SieveError, match=r"model\.layers\.1\.mlp\.down_proj.*NaN/inf.*float32"):
        calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                  CalibrationConfig())


def test_disk_failure_mid_stage_keeps_nothing_partial_and_rerun_completes(tmp_path):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False)
    run = RunDir(tmp_path / "run", trainer)

    def save_fails_halfway(result, folder):
        (folder / "part-1.bin").write_bytes(b"x" * 10)
        raise OSError(28, "No space left on device")

    with pytest.raises(SieveError, match="No space left on device.*nothing partial was kept"):
        run.stage("project", {"a": 1}, lambda work: 42, save_fails_halfway, lambda d: None)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".project.work"]

    rerun = RunDir(tmp_path / "run", trainer)
    saved = rerun.stage("project", {"a": 1}, lambda work: 42,
                        lambda r, d: (d / "value.txt").write_text(str(r)),
                        lambda d: int((d / "value.txt").read_text()))
    assert saved == 42
    again = RunDir(tmp_path / "run", trainer)
    assert again.stage("project", {"a": 1}, lambda work: pytest.fail("recomputed"),
                       lambda r, d: None, lambda d: int((d / "value.txt").read_text())) == 42


@pytest.mark.parametrize("option,value,message", [
    ("--projection.ridge", "0", "projection.ridge must be > 0"),
    ("--search.confidence", "-1", "search.confidence must be >= 0"),
])
def test_bad_unit_settings(tmp_path, capsys, option, value, message):
    assert run_cli("fit", "--config", DEMO, "--run.root", str(tmp_path), option, value) == 2
    assert message in last_error_line(capsys)
