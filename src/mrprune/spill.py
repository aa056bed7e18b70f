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
from pathlib import Path

import torch

from .errors import ResourceError

log = logging.getLogger(__name__)


class SpillStore:
    """Tensors in files of one private scratch directory, removed by :meth:`close` (mapped tensors stay valid
    after it: the files go with their last mapping)."""

    def __init__(self, parent: str | Path):
        parent = Path(parent).expanduser()
        parent.mkdir(parents=True, exist_ok=True)
        self.directory = Path(tempfile.mkdtemp(prefix=".mrprune-spill-", dir=parent))
        self.bytes = 0
        self._files = 0
        self._storages: set[int] = set()

    def empty_like(self, tensor: torch.Tensor) -> torch.Tensor:
        """An uninitialised CPU tensor of ``tensor``'s shape and dtype, backed by a new file."""
        if tensor.numel() == 0:
            return torch.empty_like(tensor, device="cpu")
        path = self.directory / f"{self._files:06d}.bin"
        self._files += 1
        size = tensor.numel() * tensor.element_size()
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            raise ResourceError(f"--offload-dir {self.directory.parent}: cannot reserve {size:,} bytes for a "
                                f"pruned block ({(exc.strerror or str(exc)).lower()}); free some space or choose "
                                "another place") from None
        finally:
            os.close(fd)
        mapped = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype)
        self._storages.add(mapped.untyped_storage().data_ptr())
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
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> SpillStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
