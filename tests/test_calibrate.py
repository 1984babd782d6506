import lightning as L
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
                      CalibrationConfig(dtype="float64", product_dtype="float64"))
    fast = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                     CalibrationConfig(dtype="float64"))  # float32 products, float64 sums
    for h in handles:
        h.remove()
    masks = [b["attention_mask"].bool() for b in tiny_data.calibration_dataloader()]
    assert any((~m).any() for m in masks), "batches must contain padding for this test"
    tokens = int(sum(m.sum() for m in masks))
    for key, names in groups.items():
        for name in names:  # every Linear of a shared-input group sees the same input
            x = torch.cat([x[m] for x, m in zip(seen[name], masks)]).double()
            torch.testing.assert_close(stats[key], x.T @ x, rtol=1e-10, atol=1e-10)
            assert fast[key].dtype == torch.float64
            torch.testing.assert_close(fast[key], x.T @ x, rtol=1e-5, atol=1e-5)
        assert int(stats[f"{key}.count"]) == tokens
    # one statistic per distinct input: 4 groups per Llama layer, not 7 matrices
    assert len([k for k in stats if not k.endswith(".count")]) == 4 * 2


def test_read_weight_counts_the_last_position_more(tiny_llama, tiny_data, trainer):
    """read_weight 3 adds the last position's xᵀx twice more (and 2 tokens per sequence)."""
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    loader = tiny_data.calibration_dataloader()
    config = dict(dtype="float64", product_dtype="float64")
    plain = calibrate(trainer, lm.net, groups, loader, CalibrationConfig(**config))
    weighted = calibrate(trainer, lm.net, groups, loader,
                         CalibrationConfig(**config, read_weight=3))
    key = next(iter(groups))
    seen = []
    handle = lm.net.get_submodule(groups[key][0]).register_forward_pre_hook(
        lambda m, args: seen.append(args[0][:, -1].detach().double()))
    with torch.no_grad():
        for batch in loader:
            lm.net(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                   position_ids=batch["position_ids"])
    handle.remove()
    last = torch.cat(seen)
    torch.testing.assert_close(weighted[key], plain[key] + 2 * last.T @ last)
    assert int(weighted[f"{key}.count"]) == int(plain[f"{key}.count"]) + 2 * len(last)


def test_calibration_examples_spread_over_the_split(tiny_llama, tiny_data, trainer):
    """calibration.examples N: the sums of N examples spread over the split."""
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    n = len(tiny_data.splits["calibration"]) // 2
    part = calibrate(trainer, lm.net, groups, tiny_data.loader("calibration", limit=n),
                     CalibrationConfig())
    whole = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    key = next(iter(groups))
    assert 0 < int(part[f"{key}.count"]) < int(whole[f"{key}.count"])


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


def stats_bytes(config, layers: int, bytes_per: int) -> int:
    """The README's formula for Llama-like models: L·(3·h² + I²)·b (one Σxᵀx per distinct input:
    q/k/v share h, o_proj reads heads·head_dim = h, gate/up share h, down_proj reads I)."""
    h, i = config.hidden_size, config.intermediate_size
    return layers * (3 * h * h + i * i) * bytes_per


def test_one_layer_at_a_time_same_statistics_in_per_layer_shards_and_memory_formula(
        tiny_llama, tiny_data, tmp_path, trainer, monkeypatch):
    """Sums live for one layer at a time (the formula's 1/L share), the other layers' weights
    stay where they are while one runs, and shards on disk, sums on the host and in memory are
    the same statistics."""
    from sieve_pl.io import SafetensorsFolder
    from sieve_pl.stages import calibrate as module

    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    loader = tiny_data.calibration_dataloader()
    layers = lm.net.config.num_hidden_layers
    held, moved = [], []
    original = module.Sums.__init__

    def recording(self, modules, config, device):
        original(self, modules, config, device)
        held.append(sum(t.nbytes for t in self.sums.values()))
    monkeypatch.setattr(module.Sums, "__init__", recording)
    original_to = torch.nn.Module.to

    def to(self, *args, **kwargs):
        if self in list(lm.net.model.layers):
            moved.append(self)
        return original_to(self, *args, **kwargs)
    monkeypatch.setattr(torch.nn.Module, "to", to)

    whole = calibrate(trainer, lm.net, groups, loader, CalibrationConfig("float64"))
    (tmp_path / "shards").mkdir()
    assert calibrate(trainer, lm.net, groups, loader, CalibrationConfig("float64"),
                     out=tmp_path / "shards") is None
    on_host = calibrate(trainer, lm.net, groups, loader, CalibrationConfig("float64",
                                                                           device="cpu"))
    on_disk = SafetensorsFolder(tmp_path / "shards")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == [
        f"stats-{i:05d}.safetensors" for i in range(layers)]
    for stats in (on_disk, on_host):
        assert stats.keys() == whole.keys()
        for key in whole:
            assert torch.equal(stats[key], whole[key]), key
    total = stats_bytes(lm.net.config, layers, 8)
    assert held == [total // layers] * layers * 3  # one layer's share at a time
    assert sum(whole[k].nbytes for k in whole if not k.endswith(".count")) == total
    # each layer is moved to the device for its turn and back, one at a time
    assert moved == [layer for layer in lm.net.model.layers for _ in range(2)] * 3


def test_the_context_gives_every_stage_the_same_calibration_examples(tiny_data, trainer):
    """calibration.examples reaches the statistics, the sensitivity gradients and learned
    projections alike: they all read ``Context.calibration_loader``."""
    from sieve_pl.stages.stage import Context

    n = len(tiny_data.splits["calibration"])
    some = Context(trainer, None, tiny_data, None, None, n // 2).calibration_loader()
    every = Context(trainer, None, tiny_data, None, None).calibration_loader()
    assert len(some.dataset) == n // 2 and len(every.dataset) == n


def test_a_layers_sums_are_freed_before_the_next_layers_exist(tiny_llama, tiny_data, tmp_path,
                                                               trainer, monkeypatch):
    """Writing shards, host memory holds one layer's sums: when a layer's sums are allocated,
    every earlier layer's are gone (by reference counting, no garbage collection needed)."""
    import gc
    import weakref

    from sieve_pl.stages import calibrate as module

    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    alive, original = [], module.Sums.__init__

    def recording(self, modules, config, device):
        assert not [ref for ref in alive if ref() is not None], "an earlier layer's sums live"
        original(self, modules, config, device)
        alive.extend(weakref.ref(t) for t in self.sums.values())
    monkeypatch.setattr(module.Sums, "__init__", recording)
    gc.disable()
    try:
        calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                  CalibrationConfig("float64"), out=tmp_path)
    finally:
        gc.enable()
    assert len(alive) == len(groups)


def test_finiteness_checked_in_blocks_finds_nan_and_inf_anywhere():
    """``all_finite`` (calibration's NaN/inf check without a whole-tensor ``abs()`` copy)."""
    from sieve_pl.maths import all_finite

    t = torch.randn(37, 29, dtype=torch.float64)
    assert all_finite(t, block_elements=100) and all_finite(torch.zeros(0))
    for bad in (float("nan"), float("inf"), -float("inf")):
        u = t.clone()
        u[36, 28] = bad  # in the last, partial block
        assert not all_finite(u, block_elements=100)
        assert not all_finite(u.T, block_elements=7)  # a non-contiguous view
