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
