"""Scratch files that hold pruned weights in place of RAM (``--offload-dir``).

Weights loaded from safetensors in the run's dtype are mapped from their files, so the host spends page cache,
not process memory, on them; but a write into such a private mapping copies the page into anonymous memory,
and after pruning every block is written: a 70B model then needs 140 GB of RAM on the host. A block written
into a file-backed *shared* mapping instead leaves dirty file pages, which the kernel writes back and evicts
under pressure. The space of each file is reserved before it is mapped, so a full disk is an error at that
moment and not a SIGBUS on some later write.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import ResourceError, reason

if TYPE_CHECKING:
    from .models.adapter import LinearRef

log = logging.getLogger(__name__)


class SpillStore:
    """Tensors in files of one private scratch directory, removed by :meth:`close`. Each file is unlinked as
    soon as it is mapped (the mapping keeps it, and its writeback, alive), so a run killed outright leaves no
    weights behind, and mapped tensors stay valid after :meth:`close`."""

    def __init__(self, parent: str | Path):
        parent = Path(parent).expanduser()
        try:
            parent.mkdir(parents=True, exist_ok=True)
            self.directory = Path(tempfile.mkdtemp(prefix=".mrprune-spill-", dir=parent))
        except OSError as exc:
            raise ResourceError(f"--offload-dir {parent}: cannot create a scratch directory there "
                                f"({reason(exc)})") from None
        self.bytes = 0
        self._files = 0
        self._storages: dict[int, torch.UntypedStorage] = {}  # held, so no other storage can take the address

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """An uninitialised CPU tensor of ``tensor``'s shape and dtype, backed by a new file."""
        if tensor.numel() == 0:
            return torch.empty_like(tensor, device="cpu")
        path = self.directory / f"{self._files:06d}.bin"
        self._files += 1
        size = tensor.numel() * tensor.element_size()
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
            mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        except (OSError, RuntimeError) as exc:
            raise ResourceError(f"--offload-dir {self.directory.parent}: cannot reserve {size:,} bytes for "
                                f"weights there ({reason(exc)}); free some space or choose another place") from None
        finally:
            path.unlink(missing_ok=True)
        storage = mapped.untyped_storage()
        self._storages[storage.data_ptr()] = storage
        self.bytes += size
        return mapped.view(tensor.shape)

    def adopt(self, tensor: torch.Tensor) -> torch.Tensor:
        """A file-backed copy of ``tensor``."""
        copy = self.empty_like(tensor)
        with torch.no_grad():
            copy.copy_(tensor)
        return copy

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives in one of this store's files."""
        return tensor.untyped_storage().data_ptr() in self._storages

    def close(self) -> None:
        log.debug("offload dir: %d files, %.1f MiB", self._files, self.bytes / 2**20)
        self._storages.clear()  # the mappings live on in the tensors that use them
        shutil.rmtree(self.directory, ignore_errors=True)


def host_copies(layers, spill: SpillStore | None, pin: bool = False) -> dict[str, torch.Tensor]:
    """Copies of the layers' weights that outlive their pruning: in ``spill``'s files when given (a model larger
    than memory), else on the host (pinned for fast copies to a GPU)."""
    copies = {}
    for ref in layers:
        if spill is not None:
            copies[ref.name] = spill.adopt(ref.weight.detach())
            continue
        saved = ref.weight.detach().to("cpu", copy=True)
        copies[ref.name] = saved.pin_memory() if pin else saved
    return copies


def snapshot(layers: Sequence[LinearRef], to: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Copies of the layers' (out x in) weights, where they are or on ``to`` (the CPU keeps device memory free)."""
    return {ref.name: ref.weight.detach().to(to, copy=True) if to is not None else ref.weight.detach().clone()
            for ref in layers}


def restore(layers: Sequence[LinearRef], saved: dict[str, torch.Tensor]) -> None:
    """Write snapshotted weights back, bit for bit (same dtype, so the copy is exact)."""
    for ref in layers:
        ref.set_weight(saved[ref.name])


def on_ram(path: str | Path, mountinfo: str = "/proc/self/mountinfo") -> bool:
    """Whether ``path`` lies on a RAM-backed filesystem (tmpfs, ramfs): files there are memory that cannot be
    evicted without swap, so spilling to them saves nothing."""
    target = os.path.realpath(Path(path).expanduser())
    best, fstype = "", ""
    try:
        with open(mountinfo, encoding="utf-8") as mounts:
            for line in mounts:
                fields = line.split()
                point = fields[4].encode().decode("unicode_escape")
                kind = fields[fields.index("-") + 1]
                inside = target == point or target.startswith(point.rstrip("/") + "/")
                if inside and len(point) >= len(best):
                    best, fstype = point, kind
    except (OSError, ValueError, IndexError):
        return False
    return fstype in ("tmpfs", "ramfs")
