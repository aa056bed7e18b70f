"""Allocators by name: each maps a job to per-layer sparsity targets that meet the global target."""

from __future__ import annotations

from typing import Callable

from ..config import AutoConfig, MrpConfig
from .alpha import AlphaAllocator
from .base import Allocation, AllocationContext, Allocator, IterativeAllocator
from .file import FileAllocator
from .fit import fit_to_target, weighted_mean
from .mrp import MrpAllocator
from .mrp_fast import FastMrpAllocator
from .owl import OwlAllocator
from .select import AutoAllocator
from .uniform import UniformAllocator

#: what the analyses compare and ``auto`` chooses from unless told: fast MRP, since the exact loop (`mrp`) takes
#: hours on a 7B model
COMPARED_BY_DEFAULT: tuple[str, ...] = tuple(AutoConfig().candidates.split(","))

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
    "auto": lambda config=None: AutoAllocator(
        [build_allocator(name, config) for name in
         (config.allocation.candidate_names() if config is not None else COMPARED_BY_DEFAULT)]
    ),
}

#: what ``auto`` may choose from, and what the analyses may compare: every allocation but ``auto`` itself
CANDIDATE_ALLOCATIONS = tuple(name for name in ALLOCATORS if name != "auto")



def build_allocator(name: str, config=None) -> Allocator:
    return ALLOCATORS[name](config)


__all__ = [
    "ALLOCATORS",
    "AutoAllocator",
    "CANDIDATE_ALLOCATIONS",
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
