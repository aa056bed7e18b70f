"""Allocators by name: each maps a job to per-layer sparsity targets that meet the global target."""

from __future__ import annotations

from typing import Callable

from ..config import MrpConfig
from .alpha import AlphaAllocator
from .base import Allocation, AllocationContext, Allocator, IterativeAllocator
from .file import FileAllocator
from .fit import fit_to_target, weighted_mean
from .mrp import MrpAllocator
from .mrp_fast import FastMrpAllocator
from .owl import OwlAllocator
from .uniform import UniformAllocator

#: name -> factory taking the job's PruneConfig
ALLOCATORS: dict[str, Callable[..., Allocator]] = {
    "uniform": lambda config=None: UniformAllocator(),
    "file": lambda config=None: FileAllocator(config.allocation.ratios),
    "mrp": lambda config=None: MrpAllocator(config.allocation.mrp if config is not None else MrpConfig()),
    "mrp-fast": lambda config=None: FastMrpAllocator(config.allocation.mrp if config is not None else MrpConfig()),
    "owl": lambda config=None: (
        OwlAllocator() if config is None else OwlAllocator(config.allocation.owl.m, config.allocation.owl.lam)
    ),
    "alphapruning": lambda config=None: (
        AlphaAllocator() if config is None else AlphaAllocator(config.allocation.alpha.eps)
    ),
}

#: what the analyses compare unless told: fast MRP, since the exact loop (`mrp`) takes hours on a 7B model
COMPARED_BY_DEFAULT = ("uniform", "owl", "alphapruning", "mrp-fast")


def build_allocator(name: str, config=None) -> Allocator:
    return ALLOCATORS[name](config)


__all__ = [
    "ALLOCATORS",
    "COMPARED_BY_DEFAULT",
    "AlphaAllocator",
    "Allocation",
    "AllocationContext",
    "Allocator",
    "FastMrpAllocator",
    "FileAllocator",
    "IterativeAllocator",
    "MrpAllocator",
    "OwlAllocator",
    "UniformAllocator",
    "build_allocator",
    "fit_to_target",
    "weighted_mean",
]
