"""SparseGPT (Frantar & Alistarh 2023): mask by w^2 / [H^-1]_jj^2 and reconstruct the remaining weights.

Follows methods.md: dead inputs get diag 1 and zero weights; relative dampening; upper Cholesky factor of H^-1;
column blocks with an adaptive mask per block; per-column error feedback inside the block, then one matrix
update for the columns to its right. Unlike the reference code, every block prunes an exact share of the
layer's count, so the layer hits its target to the weight.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import PatternError
from .base import LayerStats, PruneResult, PruningMetric, prune_unseen
from .masks import lowest_in_matrix, lowest_n_of_m, target_count
from .pattern import SparsityPattern

log = logging.getLogger(__name__)

#: multipliers of the base dampening tried when H + damp*I is not positive definite
DAMPING_RETRIES = (1.0, 10.0, 100.0, 1000.0)


def inverse_hessian_factor(hessian: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor U of (H + damp I)^-1 (so H^-1 = U^T U), and the dampening fraction that made H
    positive definite.

    With J the order-reversing permutation, J H J = L L^T gives H^-1 = (J L^-1 J)^T (J L^-1 J), and J L^-1 J
    is upper triangular with a positive diagonal: U is one Cholesky factorisation and one triangular inverse
    away, about a third of the arithmetic of inverting H and factorising the inverse.
    """
    mean_diag = float(torch.diag(hessian).mean())
    flipped = hessian.flip(0, 1)
    eye = torch.eye(hessian.shape[0], device=hessian.device, dtype=hessian.dtype)
    for factor in DAMPING_RETRIES:
        damp = max(percdamp, 1e-8) * factor
        lower, info = torch.linalg.cholesky_ex(flipped + damp * mean_diag * eye)
        if int(info) == 0:
            return torch.linalg.solve_triangular(lower, eye, upper=False).flip(0, 1), damp
        log.warning("Hessian not positive definite with dampening %.3g; retrying with more", damp)
    raise FloatingPointError(f"Hessian stays singular even with dampening {damp:.3g} of its mean diagonal")


def _block_counts(total: int, free_per_block: list[int], forced_per_block: list[int]) -> list[int]:
    """Share ``total`` pruned weights over column blocks: forced weights first, the rest in proportion to each
    block's free weights, with largest-remainder rounding so the shares sum to ``total`` exactly."""
    extra = max(total - sum(forced_per_block), 0)
    free = sum(free_per_block)
    if free == 0:
        return list(forced_per_block)
    exact = [extra * f / free for f in free_per_block]
    shares = [int(x) for x in exact]
    order = sorted(range(len(exact)), key=lambda i: shares[i] - exact[i])
    for i in order[: extra - sum(shares)]:
        shares[i] += 1
    return [f + s for f, s in zip(forced_per_block, shares)]


@dataclass
class InverseHessian:
    """What SparseGPT derives from a Hessian alone; layers fed the same input (q/k/v, gate/up) share it."""

    upper: torch.Tensor  #: upper Cholesky factor of (H + damp I)^-1, dead inputs given diagonal 1
    dead: torch.Tensor  #: inputs that were zero for every calibration token
    damp: float  #: dampening fraction that made H positive definite


def invert_hessian(hessian: torch.Tensor, percdamp: float, device: torch.device | None = None) -> InverseHessian:
    H = hessian.detach().to(device=device or hessian.device, dtype=torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    upper, damp = inverse_hessian_factor(H, percdamp)
    return InverseHessian(upper, dead, damp)


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    sparsity: float,
    pattern: SparsityPattern,
    blocksize: int = 128,
    percdamp: float = 0.01,
    forced: torch.Tensor | None = None,
    inverse: InverseHessian | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Return (pruned and reconstructed float32 weight, mask, dampening used); ``inverse`` (from
    ``invert_hessian``) replaces ``hessian`` when several layers share one."""
    W = weight.detach().to(torch.float32).clone()
    rows, cols = W.shape
    if pattern.is_nm:
        if cols % pattern.m:
            raise PatternError(f"pattern {pattern} needs in_features divisible by {pattern.m}, got {cols}")
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)
    if inverse is None:
        assert hessian is not None
        inverse = invert_hessian(hessian, percdamp, W.device)
    hinv, damp = inverse.upper, inverse.damp
    W[:, inverse.dead] = 0.0

    mask = torch.zeros_like(W, dtype=torch.bool)
    starts = list(range(0, cols, blocksize))
    if not pattern.is_nm:
        if forced is None:
            forced_counts = [0] * len(starts)
        else:
            forced_counts = [int(forced[:, s : s + blocksize].sum()) for s in starts]
        free = [rows * min(blocksize, cols - s) - f for s, f in zip(starts, forced_counts)]
        counts = _block_counts(target_count(W.numel(), sparsity), free, forced_counts)

    for b, i1 in enumerate(starts):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Hinv1 = hinv[i1:i2, i1:i2]
        d = torch.diag(Hinv1)
        block_forced = None if forced is None else forced[:, i1:i2]
        if pattern.is_nm:
            Q1, Err1, mask1 = _block_n_of_m(W1, Hinv1, pattern, block_forced)
        else:
            mask1 = lowest_in_matrix(W1.square() / d.square()[None, :], counts[b], block_forced)
            Q1, Err1 = _block_fixed_mask(W1, Hinv1, mask1)
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ hinv[i1:i2, i2:]
    W[mask] = 0.0
    return W, mask, damp


#: columns of a block whose errors one batched triangular solve finds; each leaf's errors then update the
#: block's remaining columns by one matrix product. Narrow leaves keep the per-row systems (rows x leaf x leaf)
#: small, wide ones launch fewer kernels: bench/sparsegpt_solve.py found 64 fastest on an H200 and 16 on the
#: CPU (bench/results/sparsegpt_solve_*.json).
LEAF = {"cuda": 64, "cpu": 16}
#: rows solved at once by the batched triangular solve (bounds its rows x leaf x leaf working memory)
SOLVE_ELEMENTS = 1 << 26


def _leaf_errors(W1: torch.Tensor, U: torch.Tensor, mask1: torch.Tensor) -> torch.Tensor:
    """Errors of one leaf of columns whose mask is fixed, given its current weights W1 and the leaf's block U
    of the upper Cholesky factor of H^-1.

    The reference updates column by column: e_i = m_i * w_i / d_i with w_i = w0_i - sum_{k<i} e_k U_ki, d the
    diagonal of U. With the mask known, that recurrence is, for each row r, the unit lower-triangular system
    (I + diag(m_r / d) U_s^T) e_r = m_r * w0_r / d (U_s: strictly upper part of U), so one batched triangular
    solve over the rows replaces the sequential column steps.
    """
    rows, width = W1.shape
    lower = torch.triu(U, diagonal=1).t()  # L_ik = U_ki for k < i
    scale = mask1.to(W1.dtype) / torch.diag(U)[None, :]  # m_ri / d_i
    errors = torch.empty_like(W1)
    eye = torch.eye(width, dtype=W1.dtype, device=W1.device)
    step = max(1, SOLVE_ELEMENTS // (width * width))
    for r0 in range(0, rows, step):
        r1 = min(r0 + step, rows)
        system = eye + scale[r0:r1, :, None] * lower[None, :, :]
        rhs = (scale[r0:r1] * W1[r0:r1])[:, :, None]
        errors[r0:r1] = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)[:, :, 0]
    return errors


def _block_fixed_mask(W1: torch.Tensor, Hinv1: torch.Tensor, mask1: torch.Tensor,
                      leaf: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pruned block, errors) of one column block whose mask is fixed up front (unstructured): leaf by leaf,
    solve a leaf's errors, then push them onto every later column of the block (lazy updates inside the block,
    as the reference does across blocks)."""
    leaf = leaf or LEAF.get(W1.device.type, 32)
    W1 = W1.clone()
    width = W1.shape[1]
    errors = torch.empty_like(W1)
    for j0 in range(0, width, leaf):
        j1 = min(j0 + leaf, width)
        leaf_errors = _leaf_errors(W1[:, j0:j1], Hinv1[j0:j1, j0:j1], mask1[:, j0:j1])
        errors[:, j0:j1] = leaf_errors
        # the leaf's own kept columns and every column after the leaf
        W1[:, j0:] -= leaf_errors @ torch.triu(Hinv1[j0:j1, j0:], diagonal=1)
    return W1.masked_fill(mask1, 0.0), errors


def _block_n_of_m(W1: torch.Tensor, Hinv1: torch.Tensor, pattern: SparsityPattern,
                  block_forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pruned block, errors, mask) for N:M: each group's mask depends on the updates of the groups before it,
    so columns are processed in order, choosing the N lowest w^2 / d^2 of a group when it is reached."""
    W1 = W1.clone()
    d = torch.diag(Hinv1)
    Q1 = torch.zeros_like(W1)
    Err1 = torch.zeros_like(W1)
    mask1 = torch.zeros_like(W1, dtype=torch.bool)
    for i in range(W1.shape[1]):
        if i % pattern.m == 0:
            group = slice(i, i + pattern.m)
            group_forced = None if block_forced is None else block_forced[:, group]
            mask1[:, group] = lowest_n_of_m(W1[:, group].square() / d[group].square()[None, :], pattern,
                                            group_forced)
        w = W1[:, i]
        q = w.masked_fill(mask1[:, i], 0.0)
        Q1[:, i] = q
        err = (w - q) / d[i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
        Err1[:, i] = err
    return Q1, Err1, mask1


class SparseGPT(PruningMetric):
    name = "sparsegpt"
    needs_hessian = True
    updates_weights = True

    def __init__(self, blocksize: int = 128, percdamp: float = 0.01):
        self.blocksize = blocksize
        self.percdamp = percdamp

    def prune(self, weight, stats: LayerStats, sparsity: float, pattern: SparsityPattern, forced=None) -> PruneResult:
        if stats.unseen:
            return prune_unseen(weight, stats, sparsity, pattern, forced)
        key = ("sparsegpt inverse", self.percdamp, weight.device)
        if key not in stats.derived:  # q/k/v and gate/up share their statistics, hence this
            assert stats.hessian is not None
            stats.derived[key] = invert_hessian(stats.hessian, self.percdamp, weight.device)
        new, mask, damp = sparsegpt_prune(
            weight, None, sparsity, pattern, self.blocksize, self.percdamp, forced, inverse=stats.derived[key]
        )
        if damp > self.percdamp:
            stats.notes.append(f"dampening raised to {damp:g} (Hessian not positive definite)")
        return PruneResult(new, mask)
