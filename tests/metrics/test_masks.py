import pytest
import torch

from mrprune.errors import PatternError
from mrprune.metrics.masks import lowest_in_matrix, lowest_n_of_m, lowest_per_row, select_mask, target_count
from mrprune.metrics.pattern import SparsityPattern


@pytest.mark.parametrize("shape,sparsity", [((8, 16), 0.5), ((7, 13), 0.3), ((5, 9), 0.71), ((3, 4), 0.0)])
def test_per_row_prunes_exact_total_and_rows_differ_by_at_most_one(shape, sparsity, device):
    scores = torch.rand(shape, device=device)
    mask = lowest_per_row(scores, target_count(scores.numel(), sparsity))
    assert int(mask.sum()) == round(scores.numel() * sparsity)
    per_row = mask.sum(1)
    assert int(per_row.max() - per_row.min()) <= 1


def test_per_row_prunes_the_lowest_scores_of_each_row():
    scores = torch.rand(6, 10)
    mask = lowest_per_row(scores, 6 * 4)
    for row, row_mask in zip(scores, mask):
        assert row[row_mask].max() < row[~row_mask].min()


def test_matrix_group_prunes_globally_lowest():
    scores = torch.rand(6, 10)
    mask = lowest_in_matrix(scores, 25)
    assert int(mask.sum()) == 25
    assert scores[mask].max() < scores[~mask].min()


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4), (3, 8)])
def test_n_of_m_prunes_exactly_n_lowest_in_every_group(n, m, device):
    scores = torch.rand(5, 4 * m, device=device)
    mask = lowest_n_of_m(scores, SparsityPattern(n, m))
    groups_mask = mask.view(5, -1, m)
    assert (groups_mask.sum(-1) == n).all()
    groups = scores.view(5, -1, m)
    pruned_max = groups.masked_fill(~groups_mask, -1).amax(-1)
    kept_min = groups.masked_fill(groups_mask, 2).amin(-1)
    assert (pruned_max < kept_min).all()


def test_n_of_m_rejects_indivisible_width():
    with pytest.raises(PatternError, match="divisible by 4"):
        lowest_n_of_m(torch.rand(2, 6), SparsityPattern(2, 4))


def test_forced_weights_stay_pruned_and_count():
    scores = torch.rand(4, 10)
    forced = torch.zeros(4, 10, dtype=torch.bool)
    forced[0, 9] = forced[2, 3] = True
    scores[forced] = 5.0  # high scores, but already pruned
    for group in ("row", "matrix"):
        mask = select_mask(scores, 0.5, SparsityPattern(), group, forced)
        assert mask[forced].all()
        assert int(mask.sum()) == 20


def test_forced_rows_with_more_than_their_share_keep_total_exact():
    scores = torch.rand(4, 10)
    forced = torch.zeros(4, 10, dtype=torch.bool)
    forced[1, :7] = True  # row 1 already beyond the 5-per-row share
    mask = lowest_per_row(scores, 20, forced)
    assert mask[forced].all()
    assert int(mask.sum()) == 20


def test_pattern_parsing():
    assert SparsityPattern.parse("2:4").sparsity == 0.5
    assert not SparsityPattern.parse("unstructured").is_nm
    assert str(SparsityPattern.parse(" 4 : 8 ")) == "4:8"
    from mrprune.errors import ConfigError

    for bad in ("4:2", "0:4", "2-4", "dense"):
        with pytest.raises(ConfigError):
            SparsityPattern.parse(bad)


def test_n_of_m_keeps_a_group_that_already_has_more_zeros():
    """A dequantised checkpoint can hold groups with more than N zero weights: they stay zero, the rest get N."""
    scores = torch.rand(2, 8)
    forced = torch.zeros(2, 8, dtype=torch.bool)
    forced[0, :3] = True  # three zeros in the first group of row 0
    mask = lowest_n_of_m(scores, SparsityPattern(2, 4), forced)
    assert mask[0, :3].all() and not mask[0, 3]
    per_group = mask.view(2, 2, 4).sum(-1)
    assert per_group.tolist() == [[3, 2], [2, 2]]
