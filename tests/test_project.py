import pytest
import torch

from sieve_pl.units import max_rank
from sieve_pl.units import METHODS


def _problem(h, d, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(h, d, generator=g, dtype=torch.float64)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d,
                                                                             dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # correlated inputs
    return w, x


@pytest.mark.parametrize("h,d", [(24, 16), (16, 24), (20, 20)])
def test_output_aligned_error_is_discarded_eigenvalues_and_beats_baselines(h, d):
    w, x = _problem(h, d, n=200)
    c = x.T @ x
    k = max_rank(h, d)
    eig = torch.linalg.eigvalsh(w @ c @ w.T).flip(0)
    bases = {name: fit(w, c, k) for name, fit in METHODS.items()}
    y = x @ w.T
    for r in range(0, k + 1):
        err = {}
        for name, basis in bases.items():
            a, b = basis.pair(r, w)
            assert a.shape == (r, d) and b.shape == (h, r)
            m = b @ a
            err[name] = float(((y - x @ m.T) ** 2).sum())
        assert err["output_aligned"] == pytest.approx(float(eig[r:].sum()), rel=1e-9, abs=1e-6)
        assert err["output_aligned"] <= err["weight_svd"] * (1 + 1e-9) + 1e-9
        assert err["output_aligned"] <= err["input_pca"] * (1 + 1e-9) + 1e-9


def test_output_aligned_strictly_better_than_baselines_somewhere():
    w, x = _problem(32, 32, n=300, seed=1)
    c = x.T @ x
    k = max_rank(32, 32)
    r = k // 2
    err = {}
    for name, fit in METHODS.items():
        a, b = fit(w, c, k).pair(r, w)
        err[name] = float(((x @ w.T - x @ (b @ a).T) ** 2).sum())
    assert err["output_aligned"] < 0.99 * min(err["weight_svd"], err["input_pca"])
