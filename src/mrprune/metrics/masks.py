"""Exact-count mask selection, as pure functions over score tensors.

A mask is a bool tensor shaped like the weight, True where a weight is pruned. Every function prunes exactly
the number of weights asked for: ``round(numel * sparsity)`` per layer, spread over rows as evenly as possible
(whole rows differ by at most one weight), so per-layer and global sparsity hit their targets. ``forced`` marks
weights that are already pruned (nested masks): they are always pruned again, and count towards the total.
"""

from __future__ import annotations

import torch

from ..errors import PatternError
from .pattern import SparsityPattern


def target_count(numel: int, sparsity: float) -> int:
    """Weights to prune for ``sparsity`` of ``numel`` weights (nearest integer)."""
    return int(round(numel * float(sparsity)))


def _with_forced(scores: torch.Tensor, forced: torch.Tensor | None) -> torch.Tensor:
    if forced is None or not bool(forced.any()):
        return scores
    return scores.masked_fill(forced, float("-inf"))


def lowest_in_matrix(scores: torch.Tensor, count: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Prune the ``count`` lowest scores of the whole matrix (ties broken by position)."""
    scores = _with_forced(scores, forced)
    if forced is not None:
        count = max(count, int(forced.sum()))
    flat = scores.reshape(-1)
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if count > 0:
        order = torch.argsort(flat, stable=True)
        mask[order[:count]] = True
    return mask.view_as(scores)


def per_row_counts(sorted_scores: torch.Tensor, count: int, forced_per_row: torch.Tensor | None) -> torch.Tensor:
    """Split ``count`` pruned weights over rows as evenly as possible, no row below its forced count.

    Every row gets max(forced, L) for the largest level L that fits; the remainder goes one each to the rows
    at level L whose next-lowest score is lowest.
    """
    rows, cols = sorted_scores.shape
    floor = torch.zeros(rows, dtype=torch.long, device=sorted_scores.device)
    if forced_per_row is not None:
        floor = forced_per_row.to(floor)
    count = min(max(count, int(floor.sum())), rows * cols)
    lo, hi = 0, cols  # largest level with sum(max(floor, level)) <= count
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if int(torch.clamp(floor, min=mid).sum()) <= count:
            lo = mid
        else:
            hi = mid - 1
    counts = torch.clamp(floor, min=lo)
    deficit = count - int(counts.sum())
    if deficit > 0:
        eligible = (counts == lo) & (counts < cols)
        next_score = sorted_scores.gather(1, counts.clamp(max=cols - 1)[:, None]).squeeze(1)
        next_score = next_score.masked_fill(~eligible, float("inf"))
        counts[torch.argsort(next_score, stable=True)[:deficit]] += 1
    return counts


def lowest_per_row(scores: torch.Tensor, count: int, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Prune ``count`` weights in all, the lowest of each row (the row is Wanda's comparison group)."""
    scores = _with_forced(scores, forced)
    order = torch.argsort(scores, dim=1, stable=True)
    sorted_scores = scores.gather(1, order)
    counts = per_row_counts(sorted_scores, count, None if forced is None else forced.sum(1))
    ranks = torch.arange(scores.shape[1], device=scores.device)[None, :]
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(1, order, ranks < counts[:, None])
    return mask


def lowest_n_of_m(scores: torch.Tensor, pattern: SparsityPattern, forced: torch.Tensor | None = None) -> torch.Tensor:
    """Prune the N lowest scores in every group of M consecutive input weights of each row.

    Forced weights (already zero) are taken first; a group that already has more than N of them keeps them all
    (a dequantised checkpoint can hold such groups), so it ends with more than N zeros, never fewer."""
    rows, cols = scores.shape
    if cols % pattern.m:
        raise PatternError(f"pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
    scores = _with_forced(scores, forced)
    groups = scores.reshape(rows, cols // pattern.m, pattern.m)
    idx = torch.topk(groups, pattern.n, dim=-1, largest=False, sorted=False).indices
    mask = torch.zeros_like(groups, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    mask = mask.view(rows, cols)
    return mask if forced is None else mask | forced


def select_mask(
    scores: torch.Tensor,
    sparsity: float,
    pattern: SparsityPattern,
    group: str,
    forced: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mask for one weight matrix: N:M if the pattern says so, else exact-count per ``group`` ('row'|'matrix')."""
    if pattern.is_nm:
        return lowest_n_of_m(scores, pattern, forced)
    count = target_count(scores.numel(), sparsity)
    if group == "row":
        return lowest_per_row(scores, count, forced)
    return lowest_in_matrix(scores, count, forced)
