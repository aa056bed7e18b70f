"""Allocators by name: each maps a job to per-layer sparsity targets that meet the global target."""

from __future__ import annotations

from typing import Callable

from .base import Allocation, AllocationContext, Allocator, IterativeAllocator
from .file import FileAllocator
from .fit import fit_to_target, weighted_mean
from .uniform import UniformAllocator

#: name -> factory taking the job's PruneConfig
ALLOCATORS: dict[str, Callable[..., Allocator]] = {
    "uniform": lambda config=None: UniformAllocator(),
    "file": lambda config=None: FileAllocator(config.allocation.ratios),
}


def build_allocator(name: str, config=None) -> Allocator:
    return ALLOCATORS[name](config)


__all__ = [
    "ALLOCATORS",
    "Allocation",
    "AllocationContext",
    "Allocator",
    "FileAllocator",
    "IterativeAllocator",
    "UniformAllocator",
    "build_allocator",
    "fit_to_target",
    "weighted_mean",
]
