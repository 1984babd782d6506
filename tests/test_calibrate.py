import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate


def test_statistics_equal_direct_xtx_over_non_padding_tokens(tiny_llama, tiny_data, trainer):
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    # capture raw inputs of every target Linear independently of the calibration hooks
    seen = {name: [] for names in groups.values() for name in names}
    handles = [lm.net.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen[n].append(args[0].detach().clone())) for n in seen]
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig(dtype="float64"))
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].bool() for b in tiny_data.calibration_dataloader()]
    assert any((~m).any() for m in masks), "batches must contain padding for this test"
    tokens = int(sum(m.sum() for m in masks))
    for key, names in groups.items():
        for name in names:  # every Linear of a shared-input group sees the same input
            x = torch.cat([x[m] for x, m in zip(seen[name], masks)]).double()
            torch.testing.assert_close(stats[key], x.T @ x, rtol=1e-10, atol=1e-10)
        assert int(stats[f"{key}.count"]) == tokens
    # one statistic per distinct input: 4 groups per Llama layer, not 7 matrices
    assert len([k for k in stats if not k.endswith(".count")]) == 4 * 2


def test_float32_sums_close_to_float64(tiny_llama, tiny_data, trainer):
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    loader = tiny_data.calibration_dataloader()
    s64 = calibrate(trainer, lm.net, groups, loader, CalibrationConfig("float64"))
    s32 = calibrate(trainer, lm.net, groups, loader, CalibrationConfig("float32"))
    for key in groups:
        assert s32[key].dtype == torch.float32
        torch.testing.assert_close(s32[key].double(), s64[key], rtol=1e-4, atol=1e-4)
