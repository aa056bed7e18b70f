"""Device placement, timing by phase and peak-memory measurement."""

from __future__ import annotations

import contextlib
import resource
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from .spill import SpillStore


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on the current stream only: copies a BlockMover runs on its own stream go on
    overlapping with the next phase."""
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


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
                module._buffers[key] = tensor.to(target)


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


@dataclass
class _Slot:
    """One parameter or buffer of a block: where it lives in its module, and its host (master) copy."""

    module: nn.Module
    key: str
    is_param: bool
    host: torch.Tensor

    def _param(self) -> nn.Parameter:
        return cast(nn.Parameter, self.module._parameters[self.key])

    def current(self) -> torch.Tensor:
        return self._param().data if self.is_param else cast(torch.Tensor, self.module._buffers[self.key])

    def install(self, tensor: torch.Tensor) -> None:
        if self.is_param:
            self._param().data = tensor
        else:
            self.module._buffers[self.key] = tensor


def _block_slots(block: nn.Module) -> list[_Slot]:
    return [_Slot(module, key, is_param, tensor.data if is_param else tensor)
            for module in block.modules()
            for store, is_param in ((module._parameters, True), (module._buffers, False))
            for key, tensor in store.items() if tensor is not None]


class BlockMover:
    """Brings offloaded blocks to the device one at a time and sends them back to the host.

    A block's host tensors stay its master copy while it is on the device: a block released with
    ``changed=False`` (an evaluation or statistics pass) goes back without a copy, any other is copied back into
    the same host tensors. On CUDA the next block is copied in by a helper thread on a stream of its own while
    the current one computes, so at most two blocks are on the device; that copy is used only by the fetch that
    follows, and whoever writes the host weights of blocks not on the device (a checkpoint's restore) calls
    :meth:`close` first. Without ``enabled`` (no offloading, or a CPU run) fetch and release move nothing.

    With a ``spill`` store, a block's host tensors move into its files the first time they are written: when a
    changed block comes back from the device, or (CPU, checkpoint restore) before the host copy itself is
    written (:meth:`prepare_host_write`)."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device, enabled: bool = True, wrap: bool = False,
                 spill: SpillStore | None = None):
        self.blocks = blocks
        self.device = device
        self.enabled = enabled and device.type != "cpu"
        self.wrap = wrap  # prefetch block 0 after the last one (a model forward is repeated)
        self.spill = spill
        self.prefetch = self.enabled and device.type == "cuda"
        self._stream = torch.cuda.Stream(device) if self.prefetch else None
        self._resident: dict[int, list[_Slot]] = {}
        self._pending: _Prefetch | None = None

    def fetch(self, index: int) -> nn.Module:
        """Block ``index`` on the device (and the next one on its way)."""
        block = self.blocks[index]
        if not self.enabled or index in self._resident:
            return block
        slots = _block_slots(block)
        copies = self._take_prefetched(index)
        with torch.inference_mode(False), torch.no_grad():
            if copies is None:
                copies = [slot.host.to(self.device, non_blocking=True) for slot in slots]
            for slot, copy in zip(slots, copies):
                slot.install(copy)
        self._resident[index] = slots
        self._start_prefetch(index + 1)
        return block

    def release(self, index: int, changed: bool = True) -> None:
        """Send block ``index`` back to the host, copying its tensors into their host masters unless the caller
        knows they did not change."""
        slots = self._resident.get(index)
        if slots is None:
            return
        if changed and self.spill is not None:  # files for all first: a failure leaves the block whole, resident
            fresh = [None if self.spill.holds(slot.host) else self.spill.empty_like(slot.host) for slot in slots]
            for slot, host in zip(slots, fresh):
                if host is not None:
                    slot.host = host  # the loaded copy is left unwritten
        del self._resident[index]
        with torch.inference_mode(False), torch.no_grad():
            for slot in slots:
                if changed:
                    slot.host.copy_(slot.current())
                slot.install(slot.host)

    def prepare_host_write(self, index: int) -> None:
        """Block ``index``'s host tensors are about to be written where they are (a CPU run's pruning, a
        checkpoint's restore): with a spill store, move them into its files first. A block on the device is
        left alone (its host copy is written, and spilled, when it comes back)."""
        if self.spill is None or index in self._resident:
            return
        with torch.inference_mode(False), torch.no_grad():
            for slot in _block_slots(self.blocks[index]):
                if slot.host.device.type == "cpu" and not self.spill.holds(slot.host):
                    slot.install(self.spill.adopt(slot.host))

    def close(self) -> None:
        """Every block back on the host (copied back) and no copy left in flight or on the device."""
        for index in list(self._resident):
            self.release(index)
        self.drop_prefetch()

    def drop_prefetch(self) -> None:
        """Forget the copy of the next block (e.g. before other work needs the device memory); a failure of
        that unused copy is no error of the caller's."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.join()

    # ------------------------------------------------------------------------------------------- prefetch
    def _start_prefetch(self, index: int) -> None:
        if self._stream is None:
            return
        if index >= len(self.blocks):
            if not self.wrap:
                return
            index = 0
        if index in self._resident or (self._pending is not None and self._pending.index == index):
            return
        self.drop_prefetch()
        hosts = [slot.host for slot in _block_slots(self.blocks[index])]
        self._pending = _Prefetch(index, hosts, self.device, self._stream)

    def _take_prefetched(self, index: int) -> list[torch.Tensor] | None:
        """The prefetched copies of block ``index``; a prefetch of another block is dropped (its block was not
        the one needed next)."""
        if self._pending is None or self._pending.index != index:
            self.drop_prefetch()
            return None
        pending, self._pending = self._pending, None
        try:
            copies = pending.wait()
        except torch.cuda.OutOfMemoryError:  # copied in while the previous block still held its memory
            return None  # the caller copies it now, with that memory freed (or reports the shortage itself)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(pending.done)
        for copy in copies:
            copy.record_stream(current)  # allocated on the copy stream, used and freed on this one
        return copies


class _Prefetch:
    """Copies of one block's host tensors, made on a helper thread and a side stream."""

    def __init__(self, index: int, hosts: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream):
        self.index = index
        self.done = torch.cuda.Event()
        self._copies: list[torch.Tensor] | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(target=self._run, args=(hosts, device, stream), daemon=True,
                                        name=f"mrprune-prefetch-{index}")
        self._thread.start()

    def _run(self, hosts: list[torch.Tensor], device: torch.device, stream: torch.cuda.Stream) -> None:
        try:  # a new thread's current device is cuda:0: switch to the stream's (no context made on GPU 0)
            with torch.no_grad(), torch.cuda.device(stream.device), torch.cuda.stream(stream):
                self._copies = [host.to(device, non_blocking=True) for host in hosts]
                self.done.record(stream)
        except Exception as exc:  # noqa: BLE001 - re-raised in the thread that needs the copies
            self._error = exc

    def join(self) -> None:
        self._thread.join()

    def wait(self) -> list[torch.Tensor]:
        """The copies, once made; the helper thread's error, if it failed."""
        self.join()
        if self._error is not None:
            raise self._error
        assert self._copies is not None
        return self._copies


@contextlib.contextmanager
def streamed_blocks(blocks: nn.ModuleList, device: torch.device, offload: bool):
    """While active, each offloaded block moves to ``device`` for its own forward and back to the host after
    (without a copy: a forward does not change weights); the next block is copied in meanwhile."""
    if not offload:
        yield
        return
    mover = BlockMover(blocks, device, wrap=True)

    def hooks(index: int):
        def before(module, args):
            mover.fetch(index)

        def after(module, args, output):
            mover.release(index, changed=False)

        return before, after

    handles = []
    for index, block in enumerate(blocks):
        before, after = hooks(index)
        handles += [block.register_forward_pre_hook(before), block.register_forward_hook(after)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        mover.close()  # each block back where it was (one another mover holds on the device stays there)


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


@contextlib.contextmanager
def evaluating(*models):
    """Dropout and other training-only behaviour off while pruning or measuring (a model built with
    ``from_config`` starts in training mode, which would make calibration and perplexity random); every module's
    own mode is restored afterwards (non-modules are ignored)."""
    saved = [(module, module.training) for model in models if isinstance(model, nn.Module)
             for module in model.modules()]
    for module, _ in saved:
        module.training = False
    try:
        yield
    finally:
        for module, mode in saved:
            module.training = mode


def keeps_placement(fn):
    """Decorator form of :func:`placement_kept` (and :func:`evaluating`) for analysis entry points taking
    ``model`` (and ``dense``)."""
    import functools

    @functools.wraps(fn)
    def wrapper(model=None, *args, **kwargs):
        with placement_kept(model, kwargs.get("dense")), evaluating(model, kwargs.get("dense")):
            return fn(model, *args, **kwargs)

    return wrapper
