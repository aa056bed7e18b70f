"""Device placement, timing by phase and peak-memory measurement."""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections import defaultdict

import torch
from torch import nn


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PhaseTimer:
    """Accumulates wall time per named phase; synchronises CUDA so asynchronous kernels are charged correctly.
    A phase opened inside another is charged to itself alone, so the phases add up to the wall time."""

    def __init__(self, device: torch.device | None = None):
        self.device = device or torch.device("cpu")
        self.seconds: dict[str, float] = defaultdict(float)
        self._open: list[list] = []  # [name, start of its current stretch], innermost last

    @contextlib.contextmanager
    def phase(self, name: str):
        synchronize(self.device)
        now = time.perf_counter()
        if self._open:
            outer = self._open[-1]
            self.seconds[outer[0]] += now - outer[1]
        self._open.append([name, now])
        try:
            yield
        finally:
            synchronize(self.device)
            now = time.perf_counter()
            _, start = self._open.pop()
            self.seconds[name] += now - start
            if self._open:
                self._open[-1][1] = now

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 3) for k, v in self.seconds.items()}


def peak_host_memory_mib() -> float:
    """Peak resident set size of this process so far."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 / (1024 if sys.platform == "darwin" else 1)


def peak_device_memory_mib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


def move_tree(obj, device: torch.device):
    """Move every tensor inside nested tuples/lists/dicts to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, tuple):
        return tuple(move_tree(x, device) for x in obj)
    if isinstance(obj, list):
        return [move_tree(x, device) for x in obj]
    if isinstance(obj, dict):
        return {k: move_tree(v, device) for k, v in obj.items()}
    return obj


def move_own_tensors(module: nn.Module, device: torch.device | dict[str, torch.device]) -> None:
    """Move ``module``'s own parameters and buffers (not its children's) to ``device``, or each named one to
    ``device[name]``; parameters stay the same objects (optimisers and hooks keep them)."""
    for store, is_param in ((module._parameters, True), (module._buffers, False)):
        for key, tensor in store.items():
            target = device.get(key) if isinstance(device, dict) else device
            if tensor is None or target is None or tensor.device == target:
                continue
            if is_param:
                tensor.data = tensor.data.to(target)
            else:
                store[key] = tensor.to(target)


def move_outside(model: nn.Module, prefix: str, device: torch.device) -> None:
    """Move all parameters and buffers of ``model`` except those under module ``prefix`` (the block list)."""
    for name, module in model.named_modules():
        if name != prefix and not name.startswith(prefix + "."):
            move_own_tensors(module, device)


def place_model(model: nn.Module, blocks_prefix: str, device: torch.device, offload: bool) -> None:
    """Put the model where runs expect it: all on ``device``, or with ``offload`` only the non-block parts."""
    if offload:
        move_outside(model, blocks_prefix, device)
    else:
        model.to(device)


@contextlib.contextmanager
def streamed_blocks(blocks: nn.ModuleList, device: torch.device, offload: bool):
    """While active, each offloaded block moves to ``device`` for its own forward and back to the CPU after."""
    if not offload:
        yield
        return
    home = torch.device("cpu")

    def before(module, args):
        module.to(device)

    def after(module, args, output):
        module.to(home)

    handles = [h for block in blocks for h in (block.register_forward_pre_hook(before), block.register_forward_hook(after))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        blocks.to(home)


@contextlib.contextmanager
def placement_kept(*models):
    """Put every parameter and buffer of in-memory ``models`` back on its own device afterwards: an analysis
    that runs on the accelerator must leave a caller's model where it found it (non-modules are ignored)."""
    saved = [(module, {key: t.device for key, t in [*module._parameters.items(), *module._buffers.items()]
                       if t is not None})
             for model in models if isinstance(model, nn.Module) for module in model.modules()]
    try:
        yield
    finally:
        for module, devices in saved:
            move_own_tensors(module, devices)


def keeps_placement(fn):
    """Decorator form of :func:`placement_kept` for analysis entry points taking ``model`` (and ``dense``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(model=None, *args, **kwargs):
        with placement_kept(model, kwargs.get("dense")):
            return fn(model, *args, **kwargs)

    return wrapper
