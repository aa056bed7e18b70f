import torch

from mrprune.metrics import LayerStats, SparsityPattern, Wanda, build_metric


def brute_force_wanda(weight, inputs, sparsity):
    """Reference written the slow, obvious way: per row, score every weight and drop the lowest int(in*s)."""
    rows, cols = weight.shape
    norms = [sum(float(inputs[t, j]) ** 2 for t in range(inputs.shape[0])) ** 0.5 for j in range(cols)]
    out = weight.clone()
    for i in range(rows):
        scores = sorted(range(cols), key=lambda j: (abs(float(weight[i, j])) * norms[j], j))
        for j in scores[: int(cols * sparsity)]:
            out[i, j] = 0.0
    return out


def test_wanda_matches_brute_force_reference():
    torch.manual_seed(1)
    weight = torch.randn(12, 20)
    inputs = torch.randn(50, 20) * torch.linspace(0.1, 3.0, 20)
    stats = LayerStats(tokens=50, sq_norm=inputs.square().sum(0))
    for sparsity in (0.3, 0.5, 0.8):
        result = Wanda().prune(weight, stats, sparsity, SparsityPattern())
        assert torch.equal(result.weight, brute_force_wanda(weight, inputs, sparsity))


def test_wanda_differs_from_magnitude_when_inputs_are_skewed():
    torch.manual_seed(2)
    weight = torch.randn(8, 16)
    stats = LayerStats(tokens=1, sq_norm=torch.logspace(-3, 3, 16))
    wanda = Wanda().prune(weight, stats, 0.5, SparsityPattern()).mask
    magnitude = build_metric("magnitude").prune(weight, stats, 0.5, SparsityPattern()).mask
    assert not torch.equal(wanda, magnitude)
    # heavily used inputs (large norm) survive under Wanda
    assert wanda[:, -3:].sum() < wanda[:, :3].sum()


def test_wanda_n_of_m():
    weight = torch.randn(4, 16)
    stats = LayerStats(tokens=1, sq_norm=torch.rand(16) + 0.1)
    result = Wanda().prune(weight, stats, 0.5, SparsityPattern(2, 4))
    assert ((result.weight.view(4, 4, 4) == 0).sum(-1) == 2).all()
