"""``sieve-pl plan``: the estimates read the model's real shapes, splitting lowers what one GPU
holds, the calibration disk figure is what calibration writes, and a plan that cannot fit is
refused in one line."""
from __future__ import annotations

import pytest

from sieve_pl.cli import main
from sieve_pl.errors import SieveError
from sieve_pl.plan import Estimate, check

QUIET = ["--trainer.enable_progress_bar", "false"]
STAGES = ("calibrate", "project", "sensitivity", "search", "evaluate", "recover")


def plan_rows(capsys, *args) -> dict[str, list[str]]:
    try:
        main(["plan", *args, *QUIET])
    except SystemExit as exit_:
        assert exit_.code in (0, None)
    out = capsys.readouterr().out
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells and cells[0] in STAGES:
            rows[cells[0]] = cells
    return rows


def gib(cell: str) -> float:
    number, unit = cell.split()
    return float(number) * (1 if unit == "GiB" else 1 / 1024)


def data_args(tiny_llama, tmp_path) -> list[str]:
    return ["--model.pretrained", tiny_llama, "--run.root", str(tmp_path), "--data.sizes",
            "{calibration: 12, validation: 10, test: 10, train: 10}", "--data.batch_size", "4",
            "--recover.enabled", "true"]


def test_plan_lists_every_stage_and_splitting_lowers_the_per_gpu_share(tmp_path, tiny_llama,
                                                                        capsys):
    one = plan_rows(capsys, *data_args(tiny_llama, tmp_path), "--gpus", "1")
    assert set(one) == set(STAGES)
    eight = plan_rows(capsys, *data_args(tiny_llama, tmp_path), "--gpus", "8",
                      "--model.placement", "split")
    for stage in ("search", "evaluate"):  # whole-model stages: the model spread over 8 GPUs
        assert gib(eight[stage][1]) < gib(one[stage][1])
    # the layer-by-layer stages hold one layer whatever the GPU count
    assert gib(eight["project"][1]) == pytest.approx(gib(one["project"][1]), rel=0.05)


def test_plan_shapes_match_the_loaded_model(tiny_llama, tiny_data):
    from sieve_pl.models.module import SieveLM
    from sieve_pl.plan import shapes
    from sieve_pl.stages.project import ProjectionConfig

    lm = SieveLM(tiny_llama)
    found = shapes(lm, tiny_data, ProjectionConfig())  # a meta-device model: no weight read
    lm.load()
    net = lm.net
    assert found.layers == net.config.num_hidden_layers
    assert found.model_bytes == sum(p.numel() * 4 for p in net.parameters())
    assert found.layer_bytes == sum(p.numel() * 4 for p in net.model.layers[0].parameters())
    # one input group per distinct input of a layer: q/k/v, o, gate/up, down
    assert sorted(found.stats) == [32, 32, 32, 48]
    assert found.examples["calibration"] == len(tiny_data.splits["calibration"])
    assert found.calibration_tokens == sum(
        int(b["attention_mask"].sum()) for b in tiny_data.calibration_dataloader())


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_calibration_disk_estimate_is_what_calibration_writes(tmp_path, tiny_llama, tiny_data,
                                                              trainer, dtype):
    from sieve_pl.models.module import SieveLM
    from sieve_pl.plan import estimate, shapes
    from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
    from sieve_pl.stages.project import ProjectionConfig
    from sieve_pl.stages.recover import RecoverConfig
    from sieve_pl.stages.search import SearchConfig

    config = CalibrationConfig(dtype=dtype)
    lm = SieveLM(tiny_llama)
    rows = estimate(shapes(lm, tiny_data, ProjectionConfig()), config, SearchConfig(),
                    RecoverConfig(), gpus=0, tflops=0.1)
    planned = next(r for r in rows if r.stage == "calibrate").disk_mb * 2 ** 20
    lm.load()
    calibrate(trainer, lm.net, lm.adapter.input_groups(lm.net),
              tiny_data.calibration_dataloader(), config, out=tmp_path)
    written = sum(p.stat().st_size for p in tmp_path.glob("stats-*.safetensors"))
    assert written == pytest.approx(planned, rel=0.05)  # headers and token counts aside


def test_a_stage_that_cannot_fit_is_refused_in_one_line():
    rows = [Estimate("calibrate", 10 * 1024, 4 * 1024, 0, 1.0),
            Estimate("search", 90 * 1024, 2 * 1024, 0, 1.0)]
    check(rows, 1, 100 * 1024, 64 * 1024)  # fits
    with pytest.raises(SieveError, match=r"^search needs about 90\.0 GiB per GPU, more than "
                                         r"80\.0 GiB"):
        check(rows, 1, 80 * 1024, 64 * 1024)
    with pytest.raises(SieveError, match="calibrate needs about 4.0 GiB of host memory"):
        check(rows, 0, None, 3 * 1024)
