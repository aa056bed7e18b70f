"""The allocation interface: how much each block (or linear layer) is pruned to reach a global target."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from ..metrics.base import LayerStats
from ..models.adapter import ModelAdapter
from .fit import fit_to_target

if TYPE_CHECKING:
    import torch

    from ..runner import LayerRecord, SequentialPruner


@dataclass
class AllocationContext:
    """What an allocator may use. ``target`` None lets the allocator choose (e.g. a ratios file's own mean).

    ``dense_stats()`` returns, for every decoder linear layer, the float32 input statistics (``sq_norm``) of the
    DENSE model on the calibration set; it is computed once, on first use, by a sequential pass.
    """

    adapter: ModelAdapter
    target: float | None
    granularity: str = "block"
    options: Any = None  # the job's PruneConfig, for allocator-specific options
    dense_stats: Callable[[], dict[str, LayerStats]] | None = None
    device: torch.device | None = None  # the run's compute device (weights may sit on the host: --offload)


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
    #: True if ``allocate`` calls ``ctx.dense_stats()`` (calibration data is then sampled even for magnitude)
    needs_calibration: ClassVar[bool] = False

    @abstractmethod
    def allocate(self, ctx: AllocationContext) -> Allocation:
        """Per-block or per-layer ratios hitting ``ctx.target`` in the parameter-weighted sense."""

    def check_options(self, target: float | None) -> None:
        """Raise a ConfigError for what is wrong with this allocation's options against ``target`` alone, with no
        model at hand (an analysis checks every cell of its grid so). Nothing to check by default."""

    def check_shape(self, ctx: AllocationContext) -> None:
        """Raise a ConfigError for what is wrong with this allocation on the model's shape (``ctx.adapter`` may
        wrap a weightless skeleton): checked before the weights load. By default, only the options."""
        self.check_options(ctx.target)


class IterativeAllocator(Allocator):
    """An allocator that decides the ratios while it prunes (MRP): it drives the sequential pruner itself."""

    needs_calibration = True

    def allocate(self, ctx: AllocationContext) -> Allocation:
        raise TypeError(f"{self.name} allocates while pruning; call prune() instead")

    @abstractmethod
    def prune(
        self, ctx: AllocationContext, pruner: SequentialPruner, input_ids: torch.Tensor
    ) -> tuple[Allocation, list[LayerRecord]]:
        """Prune the model to ``ctx.target``; return the resulting allocation and per-layer records."""


def fit_blocks(adapter: ModelAdapter, raw: list[float], target: float) -> list[float]:
    """Clamp raw per-block ratios to [0, 0.99] and shift them so the weighted mean is exactly ``target``."""
    return fit_to_target(raw, adapter.block_sizes(), target)
