"""Ratios from a JSON/YAML file: a list (one per block), {"blocks": [...]}, or {"layers": {name: ratio}}.

The file gives the shape of the allocation; if a global target is also given and differs from the file's
parameter-weighted mean, the ratios are shifted (clamped to [0, 0.99]) to hit it exactly.
"""

from __future__ import annotations

import logging

from ..config import read_data
from ..errors import ConfigError
from .base import Allocation, AllocationContext, Allocator
from .fit import fit_to_target, weighted_mean

log = logging.getLogger(__name__)


def _check_ratio(where: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ConfigError(f"ratio for {where} must be a number in [0, 1), got {value!r}")
    return float(value)


def read_ratios(path: str) -> list[float] | dict[str, float]:
    """Per-block list or per-layer mapping from ``path``."""
    data = read_data(path)
    if isinstance(data, dict):
        if len(data) != 1 or not set(data) <= {"blocks", "layers"}:
            raise ConfigError(f"ratios file {path} must hold a list, or exactly one of the keys 'blocks' or 'layers'")
        if "blocks" in data and not isinstance(data["blocks"], list):
            raise ConfigError(f"ratios file {path}: 'blocks' must be a list with one ratio per block, in order, "
                              f"got {type(data['blocks']).__name__}")
        if "layers" in data and not isinstance(data["layers"], dict):
            raise ConfigError(f"ratios file {path}: 'layers' must map layer names to ratios, "
                              f"got {type(data['layers']).__name__}")
        data = data.get("blocks", data.get("layers"))
    if isinstance(data, list):
        return [_check_ratio(f"block {i}", v) for i, v in enumerate(data)]
    if isinstance(data, dict):
        return {str(k): _check_ratio(str(k), v) for k, v in data.items()}
    raise ConfigError(f"ratios file {path} must hold a list of per-block ratios or a mapping of layer ratios")


class FileAllocator(Allocator):
    name = "file"

    def __init__(self, path: str):
        self.path = path

    def allocate(self, ctx: AllocationContext) -> Allocation:
        allocation, raw, fitted = self._fit(ctx)
        shift = max(abs(a - b) for a, b in zip(raw, fitted))
        if shift > 1e-6:
            log.warning("ratios from file shifted by up to %.4f to hit the global target", shift)
        return allocation

    def check_shape(self, ctx: AllocationContext) -> None:
        self._fit(ctx)  # the file against the model's blocks or layers; the shift is reported by allocate

    def _fit(self, ctx: AllocationContext) -> tuple[Allocation, list[float], list[float]]:
        """The allocation, with the file's ratios and the ratios fitted to the target."""
        ratios = read_ratios(self.path)
        adapter = ctx.adapter
        if isinstance(ratios, list):
            if len(ratios) != adapter.num_blocks:
                raise ConfigError(
                    f"ratios file {self.path} has {len(ratios)} block ratios but the model has {adapter.num_blocks} blocks"
                )
            sizes = adapter.block_sizes()
            target = weighted_mean(ratios, sizes) if ctx.target is None else ctx.target
            fitted = fit_to_target(ratios, sizes, target)
            return Allocation.from_blocks(self.name, adapter, fitted, target, source=self.path), ratios, fitted
        layers = adapter.all_linear_layers()
        names = [ref.name for ref in layers]
        unknown = sorted(set(ratios) - set(names))
        if unknown:
            raise ConfigError(f"ratios file {self.path} names unknown layer '{unknown[0]}' (see 'mrprune info MODEL')")
        missing = [n for n in names if n not in ratios]
        if missing:
            raise ConfigError(f"ratios file {self.path} gives no ratio for layer '{missing[0]}' ({len(missing)} missing)")
        raw = [ratios[n] for n in names]
        sizes = [ref.numel for ref in layers]
        target = weighted_mean(raw, sizes) if ctx.target is None else ctx.target
        fitted = fit_to_target(raw, sizes, target)
        allocation = Allocation.from_layers(self.name, adapter, dict(zip(names, fitted)), target, source=self.path)
        return allocation, raw, fitted
