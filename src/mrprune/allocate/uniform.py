"""Uniform allocation: every block at the global target."""

from __future__ import annotations

from .base import Allocation, AllocationContext, Allocator


class UniformAllocator(Allocator):
    name = "uniform"

    def allocate(self, ctx: AllocationContext) -> Allocation:
        target = 0.5 if ctx.target is None else ctx.target
        return Allocation.from_blocks(self.name, ctx.adapter, [target] * ctx.adapter.num_blocks, target)

    def check_shape(self, ctx: AllocationContext) -> None:
        self.allocate(ctx)  # the block sizes are all it reads
