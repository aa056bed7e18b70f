"""The allocation interface: how much each block (or linear layer) is pruned to reach a global target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..models.adapter import ModelAdapter
from .fit import fit_to_target


@dataclass
class AllocationContext:
    """What an allocator may use. ``target`` None lets the allocator choose (e.g. a ratios file's own mean)."""

    adapter: ModelAdapter
    target: float | None
    granularity: str = "block"
    options: Any = None  # the job's PruneConfig, for allocator-specific options


@dataclass
class Allocation:
    """Per-layer sparsity targets whose parameter-weighted mean is the global target."""

    method: str
    target: float
    layer_targets: dict[str, float]
    block_targets: list[float]
    details: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_blocks(cls, method: str, adapter: ModelAdapter, ratios: list[float], target: float, **details) -> Allocation:
        layer_targets = {ref.name: ratios[ref.block] for ref in adapter.all_linear_layers()}
        return cls(method, target, layer_targets, list(ratios), details)

    @classmethod
    def from_layers(cls, method: str, adapter: ModelAdapter, layer_targets: dict[str, float], target: float,
                    **details) -> Allocation:
        blocks = []
        for i in range(adapter.num_blocks):
            refs = adapter.linear_layers(i)
            total = sum(r.numel for r in refs)
            blocks.append(sum(layer_targets[r.name] * r.numel for r in refs) / total)
        return cls(method, target, dict(layer_targets), blocks, details)


    def whole_weight_targets(self, adapter: ModelAdapter) -> dict[str, float]:
        """Layer targets rounded to whole weights with largest-remainder rounding, so the layers' pruned
        counts sum to round(target x all weights): the global target is met to one weight, not one per layer."""
        refs = adapter.all_linear_layers()
        exact = [self.layer_targets[r.name] * r.numel for r in refs]
        counts = [int(x) for x in exact]
        total = round(sum(exact))
        order = sorted(range(len(refs)), key=lambda i: counts[i] - exact[i])
        for i in order[: max(total - sum(counts), 0)]:
            counts[i] += 1
        return {r.name: c / r.numel for r, c in zip(refs, counts)}


class Allocator(ABC):
    name: ClassVar[str]

    @abstractmethod
    def allocate(self, ctx: AllocationContext) -> Allocation:
        """Per-block or per-layer ratios hitting ``ctx.target`` in the parameter-weighted sense."""


def fit_blocks(adapter: ModelAdapter, raw: list[float], target: float) -> list[float]:
    """Clamp raw per-block ratios to [0, 0.99] and shift them so the weighted mean is exactly ``target``."""
    return fit_to_target(raw, adapter.block_sizes(), target)
