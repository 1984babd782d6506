"""The unit kinds' shared machinery: packed Cholesky factors, the blocked greedy order, bases
files read one unit at a time, the Pruner's incremental rebuilds, projection shared over ranks."""
import pytest
import torch

from sieve_pl.models.module import SieveLM
from sieve_pl.models.pruning import Pruner
from sieve_pl.stages.calibrate import CalibrationConfig, calibrate
from sieve_pl.stages.project import ProjectionConfig, project, share
from sieve_pl.units import Bases, greedy_order
from sieve_pl.units.neurons import pack_lower, solve_packed, unpack_lower


def test_packed_lower_triangle_gives_every_leading_block_in_half_the_space():
    for n in (5, 128, 300):
        lower = torch.tril(torch.randn(n, n))
        packed = pack_lower(lower, 128)
        assert packed.numel() <= n * n / 2 + n * 64
        for k in (1, 7, 127, 128, 129, n):
            if k <= n:
                assert torch.equal(unpack_lower(packed, n, k, 128), lower[:k, :k]), (n, k)


def serial_greedy(w, c_lam):
    """The unblocked pivoted Cholesky greedy, one neuron per step (the reference)."""
    n = c_lam.shape[0]
    residual_w, diag = w @ c_lam, c_lam.diagonal().clone()
    chol, free, order = torch.zeros_like(c_lam), torch.ones(n, dtype=torch.bool), []
    for t in range(n):
        gain = residual_w.square().sum(0) / diag.clamp(min=1e-300)
        j = int(torch.where(free, gain, -torch.inf).argmax())
        col = c_lam[:, j] - chol[:, :t] @ chol[j, :t]
        col = col / col[j].sqrt()
        chol[:, t], free[j] = col, False
        diag -= col.square()
        residual_w -= torch.outer(w @ col, col)
        order.append(j)
    return torch.tensor(order), chol


@pytest.mark.parametrize("block,pool", [(1, 1), (4, 4), (8, 2)])
def test_blocked_greedy_is_the_serial_greedy(block, pool):
    """A block of picks is the serial greedy's whenever they lie in the pool; the Cholesky
    columns are those of C_λ in that order either way."""
    g = torch.Generator().manual_seed(0)
    h, n = 12, 40
    x = torch.randn(500, n, generator=g, dtype=torch.float64) @ torch.randn(
        n, n, generator=g, dtype=torch.float64)
    c = x.T @ x / 500
    c_lam = c + 0.1 * c.diagonal().mean() * torch.eye(n, dtype=torch.float64)
    w = torch.randn(h, n, generator=g, dtype=torch.float64)
    order, chol = greedy_order(w, c_lam, block, pool)
    torch.testing.assert_close(chol @ chol.T, c_lam)  # a full factorisation
    lower = chol[order]
    torch.testing.assert_close(lower, torch.tril(lower))  # triangular in the order found
    reference, _ = serial_greedy(w, c_lam)
    if block == 1:
        assert torch.equal(order, reference)
    else:  # the same choice of neurons for most prefixes
        agree = sum(set(order[:k].tolist()) == set(reference[:k].tolist())
                    for k in range(block, n, block))
        assert agree >= (n // block - 1) * 0.7


@pytest.fixture
def projected(tiny_llama, tiny_data, tmp_path, trainer):
    lm = SieveLM(tiny_llama)
    lm.load()
    groups = lm.adapter.input_groups(lm.net)
    stats = calibrate(trainer, lm.net, groups, tiny_data.calibration_dataloader(),
                      CalibrationConfig())
    folder = tmp_path / "bases"
    folder.mkdir()
    config = ProjectionConfig(attention="heads")
    lazy = project(lm.net, groups, stats, config, work=folder, mlps=lm.adapter.mlps(lm.net),
                   attentions=lm.adapter.attentions(lm.net))
    return lm, groups, stats, config, folder, lazy


def test_bases_files_are_self_describing_and_read_one_unit_at_a_time(projected):
    lm, groups, stats, config, folder, cached = projected
    assert sorted(p.name for p in folder.iterdir()) == ["bases-00000.safetensors",
                                                        "bases-00001.safetensors"]
    lazy = Bases.folder(folder, cache_below=0)  # nothing read until a unit is used
    memory = project(lm.net, groups, stats, config, mlps=lm.adapter.mlps(lm.net),
                     attentions=lm.adapter.attentions(lm.net))
    assert lazy.specs == memory.specs == cached.specs
    assert {type(s).__name__ for s in lazy.specs.values()} == {"Spec", "NeuronSpec", "HeadSpec"}
    for name in memory:
        for key, t in memory[name].tensors().items():
            assert torch.equal(lazy[name].tensors()[key], t), (name, key)
            assert t.dtype in (torch.float32, torch.int64)


def test_pruner_rebuilds_only_the_units_whose_size_changed_and_error_leaves_weights(
        projected, monkeypatch):
    lm, *_, lazy = projected
    pruner = Pruner(lm.net, lazy)
    dense = {n: p.detach().clone() for n, p in lm.net.named_parameters()}
    for name, unit in pruner.units.items():  # pricing a cut never touches the dense weights
        unit.error(unit.size(0.5, 1))
    assert all(torch.equal(p, dense[n]) for n, p in lm.net.named_parameters())
    built = []
    for unit in pruner.units.values():
        original = unit.modules
        monkeypatch.setattr(unit, "modules", lambda *a, u=unit, o=original, **k:
                            built.append(u.name) or o(*a, **k))
    names = pruner.names
    levels = dict.fromkeys(names, 0.5)
    pruner.apply(levels)
    assert sorted(built) == sorted(names)
    built.clear()
    pruner.apply({**levels, names[0]: 0.25})
    assert built == [names[0]]
    built.clear()
    pruner.apply({**levels, names[0]: 0.25, names[1]: 1.0})  # back to dense: nothing to build
    assert built == []
    pruner.apply(1.0)
    assert all(torch.equal(p, dense[n]) for n, p in lm.net.named_parameters())


def test_layers_are_shared_over_ranks_by_cost():
    costs = {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 4.0}
    shares = share(costs, 2)
    assert sorted(sum(shares, [])) == list(costs) and shares == [[4], [0, 1, 2, 3]]
    assert share({i: 1.0 for i in range(8)}, 4) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert share({0: 1.0}, 3) == [[0], [], []]


def test_solve_with_the_packed_factor_equals_the_square_triangular_solve():
    """``solve_packed`` (block rows from the last, no k × k matrix) gives the triangular
    solve's answer for any prefix k, block boundaries included."""
    torch.manual_seed(0)
    for n, k in [(300, 300), (300, 257), (300, 128), (300, 5), (128, 100)]:
        a = torch.randn(n, n, dtype=torch.float64)
        lower = torch.linalg.cholesky(a @ a.T + n * torch.eye(n, dtype=torch.float64))
        g = torch.randn(7, n, dtype=torch.float64)
        expected = torch.linalg.solve_triangular(lower[:k, :k], g[:, :k], upper=False,
                                                 left=False)
        got = solve_packed(pack_lower(lower, 128), n, k, g[:, :k].clone(), 128)
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_packing_picked_rows_equals_packing_the_picked_matrix():
    """``pack_lower(chol, rows=order)`` packs ``chol[order]``'s lower triangle without forming
    it; whatever lies above the diagonal is left out."""
    torch.manual_seed(0)
    for n in (300, 128, 5):
        square = torch.randn(n, n)
        order = torch.randperm(n)
        assert torch.equal(pack_lower(square, 128, rows=order),
                           pack_lower(square[order].tril(), 128))
