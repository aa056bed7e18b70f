import pytest
import torch

from mrprune.metrics import LayerStats, SparseGPT, SparsityPattern, Wanda, sparsegpt_prune
from mrprune.metrics.sparsegpt import _block_counts


def correlated_inputs(tokens=512, dim=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(dim, dim, generator=g) / dim**0.5
    return torch.randn(tokens, dim, generator=g) @ mixing + 0.1 * torch.randn(tokens, dim, generator=g)


def reconstruction_error(weight, pruned, x):
    return float((x @ weight.t() - x @ pruned.t()).norm())


@pytest.mark.parametrize("pattern", [SparsityPattern(), SparsityPattern(2, 4)])
def test_sparsegpt_reconstructs_better_than_wanda(pattern, device):
    x = correlated_inputs().to(device)
    weight = torch.randn(48, 64, generator=torch.Generator().manual_seed(5)).to(device)  # same draw on every device
    stats = LayerStats(tokens=x.shape[0], sq_norm=x.square().sum(0), hessian=x.t() @ x)
    sgpt = SparseGPT(blocksize=16).prune(weight, stats, 0.5, pattern).weight
    wanda = Wanda().prune(weight, stats, 0.5, pattern).weight
    assert reconstruction_error(weight, sgpt, x) < 0.8 * reconstruction_error(weight, wanda, x)


@pytest.mark.parametrize("sparsity", [0.3, 0.5, 0.77])
def test_sparsegpt_hits_exact_count(sparsity, device):
    x = correlated_inputs(dim=40).to(device)
    weight = torch.randn(24, 40, generator=torch.Generator().manual_seed(6)).to(device)
    pruned, mask, _ = sparsegpt_prune(weight, x.t() @ x, sparsity, SparsityPattern(), blocksize=16)
    assert int((pruned == 0).sum()) == round(weight.numel() * sparsity) == int(mask.sum())


def test_sparsegpt_n_of_m_exact():
    x = correlated_inputs(dim=32)
    pruned, _, _ = sparsegpt_prune(torch.randn(8, 32), x.t() @ x, 0.5, SparsityPattern(2, 4), blocksize=12)
    assert ((pruned.view(8, 8, 4) == 0).sum(-1) == 2).all()


def test_dead_inputs_are_zeroed_and_singular_hessian_survives():
    x = correlated_inputs(dim=16)
    x[:, 3] = 0.0  # a dead input feature: H has a zero row and column
    weight = torch.randn(8, 16)
    pruned, mask, damp = sparsegpt_prune(weight, x.t() @ x, 0.5, SparsityPattern(), blocksize=8)
    assert (pruned[:, 3] == 0).all()
    assert torch.isfinite(pruned).all()


def test_non_positive_definite_hessian_retries_with_more_dampening():
    hessian = torch.eye(8)
    hessian[0, 1] = hessian[1, 0] = 1.5  # indefinite: eigenvalues 2.5 and -0.5
    stats = LayerStats(tokens=1, hessian=hessian)
    result = SparseGPT(percdamp=0.01).prune(torch.randn(4, 8), stats, 0.5, SparsityPattern())
    assert torch.isfinite(result.weight).all()
    assert any("dampening raised" in note for note in stats.notes)


def test_forced_weights_stay_zero():
    x = correlated_inputs(dim=32)
    weight = torch.randn(8, 32)
    weight[0, :5] = 0.0
    pruned, mask, _ = sparsegpt_prune(weight, x.t() @ x, 0.5, SparsityPattern(), blocksize=8, forced=weight == 0)
    assert (pruned[0, :5] == 0).all()
    assert int((pruned == 0).sum()) == 128


def test_block_counts_sum_exactly():
    counts = _block_counts(101, [40, 40, 23], [0, 5, 0])
    assert sum(counts) == 101 and counts[1] >= 5


def column_by_column(W1, Hinv1, mask1):
    """The reference recurrence of one column block, one column at a time."""
    W1 = W1.clone()
    errors = torch.zeros_like(W1)
    for i in range(W1.shape[1]):
        err = W1[:, i].masked_fill(~mask1[:, i], 0.0) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        errors[:, i] = err
    return W1.masked_fill(mask1, 0.0), errors


@pytest.mark.parametrize("leaf", [1, 5, 16, 40])
def test_leaf_blocked_solve_matches_the_column_recurrence(leaf, device, monkeypatch):
    from mrprune.metrics import sparsegpt as module

    monkeypatch.setattr(module, "SOLVE_ELEMENTS", 7 * 16 * 16)  # several row chunks as well
    x = correlated_inputs(dim=40, seed=3).double()
    hinv, _ = module.inverse_hessian_factor(x.t() @ x, 0.01)
    W1 = torch.randn(24, 40, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    mask1 = torch.rand(24, 40, generator=torch.Generator().manual_seed(9)) < 0.6
    expected = column_by_column(W1, hinv, mask1)
    got = module._block_fixed_mask(W1.to(device), hinv.to(device), mask1.to(device), leaf=leaf)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-9, atol=1e-9)


def test_layers_sharing_statistics_share_one_inverse_and_match_separate_runs():
    x = correlated_inputs(dim=32, seed=4)
    weights = [torch.randn(16, 32, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    shared = LayerStats(tokens=x.shape[0], hessian=x.t() @ x)
    metric = SparseGPT(blocksize=8)
    together = [metric.prune(w, shared, 0.5, SparsityPattern()).weight for w in weights]
    assert len(shared.derived) == 1
    for w, got in zip(weights, together):
        alone = metric.prune(w, LayerStats(tokens=x.shape[0], hessian=x.t() @ x), 0.5, SparsityPattern()).weight
        torch.testing.assert_close(got, alone, rtol=0, atol=0)


def test_inverse_factor_is_the_upper_cholesky_factor_of_the_dampened_inverse(device):
    from mrprune.metrics.sparsegpt import inverse_hessian_factor

    x = correlated_inputs(dim=48, seed=7).double().to(device)
    hessian = x.t() @ x
    upper, damp = inverse_hessian_factor(hessian, 0.01)
    dampened = hessian + damp * torch.diag(hessian).mean() * torch.eye(48, dtype=hessian.dtype, device=device)
    expected = torch.linalg.cholesky(torch.linalg.inv(dampened), upper=True)
    torch.testing.assert_close(upper, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("parts", [1, 3, 4])
def test_tiled_gram_accumulates_the_full_symmetric_hessian(parts, device):
    from mrprune.calibrate import accumulate_gram, mirror_gram

    batches = [correlated_inputs(tokens=64, dim=37, seed=s).to(device) for s in range(3)]
    hessian = torch.zeros(37, 37, device=device)
    for x in batches:
        accumulate_gram(hessian, x, parts)
    mirror_gram(hessian, parts)
    x = torch.cat(batches)
    torch.testing.assert_close(hessian, x.t() @ x, rtol=1e-5, atol=1e-4)
