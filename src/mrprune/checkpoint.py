"""Resumable runs: progress saved after every finished block, so an interrupted job continues where it stopped.

A checkpoint directory holds

* ``block-NNNNN-gG.safetensors``: the pruned linear weights of block N (parameter name -> tensor, as stored)
  as saved for the G-th commit (exact MRP saves a block again at every iteration that changes it);
* ``activations-NNNNN.safetensors``: the calibration activations entering block N (one tensor, ``hidden``);
* ``progress.json``: format, fingerprint, stage, next block, layer records and allocator state;
* ``.lock``: locked (flock) by the run using the directory while it runs, so a second run started on the
  same directory is refused instead of mixing its blocks with the first one's.

Every file is written to a temporary name and renamed into place (``os.replace``), and ``progress.json`` last:
it names the files that belong to it, and a file is never overwritten while a committed progress.json names it
(a block saved again gets the next commit's name), so a crash between two writes leaves the previous,
consistent state; files no progress.json names are removed at the next commit and when a resume opens it.
The fingerprint holds everything that determines the result (the config without output, evaluation and
checkpoint options; the model source and a hash of its config; a hash of the calibration token ids; device
type and dtype). Resuming with a different one is a one-line error saying which part differs.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from . import locking
from .errors import CheckpointError, reason
from .models.adapter import ModelAdapter

log = logging.getLogger(__name__)

FORMAT = 2  # 2: block files named per commit (block_files in progress.json)
PROGRESS = "progress.json"
#: held (flock) by the run using the directory, so a second run started on it is refused
LOCK = ".lock"
_TMP_PREFIX = ".tmp-"

#: config keys (dotted prefixes) that do not change the pruned weights: left out of the fingerprint
NOT_FINGERPRINTED = (
    "model",  # the model is fingerprinted by its resolved source and config instead
    "calibration",  # covered exactly by the hash of the calibration token ids
    "output", "overwrite", "evaluate", "evaluation",
    "runtime.device", "runtime.dtype",  # fingerprinted as resolved (device type, dtype)
    "runtime.checkpoint_dir", "runtime.resume", "runtime.remove_checkpoint", "runtime.preflight",
    "runtime.offload", "runtime.offload_activations", "runtime.offload_dir",  # placement only: same arithmetic
    "runtime.trust_remote_code", "runtime.allow_pickle",
)


# ------------------------------------------------------------------------------------------------ fingerprint


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in NOT_FINGERPRINTED)


def model_config_hash(model_config) -> str:
    """sha256 of a transformers config, without the keys that vary between loads of the same model."""
    data = model_config.to_dict() if hasattr(model_config, "to_dict") else dict(model_config)
    volatile = {"transformers_version", "dtype", "torch_dtype", "use_cache"}
    kept = {k: v for k, v in data.items() if not k.startswith("_") and k not in volatile}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()


def ids_hash(ids: torch.Tensor | None) -> str | None:
    if ids is None:
        return None
    array = ids.detach().to("cpu", torch.long).contiguous().numpy()
    return hashlib.sha256(repr(tuple(array.shape)).encode() + array.tobytes()).hexdigest()


def fingerprint(config, source: str, model_config, calibration_ids: torch.Tensor | None, device: torch.device,
                dtype: torch.dtype, num_blocks: int) -> dict[str, Any]:
    """Everything that determines a run's pruned weights, as a JSON-able dict of named parts."""
    options = {k: v for k, v in _flatten(config.to_dict()).items() if not _ignored(k)}
    return {
        "format": FORMAT,
        "config": options,
        "model": {"source": source, "config_sha256": model_config_hash(model_config), "blocks": num_blocks},
        "calibration": {
            "sha256": ids_hash(calibration_ids),
            "shape": None if calibration_ids is None else list(calibration_ids.shape),
        },
        "runtime": {"device": device.type, "dtype": str(dtype).replace("torch.", "")},
    }


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."


def mismatch(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """Which part of two fingerprints differs, in words; None when they agree."""
    if saved.get("format") != current.get("format"):
        return f"checkpoint format {saved.get('format')} (this mrprune writes {current.get('format')})"
    old, new = saved.get("config", {}), current.get("config", {})
    for key in sorted(set(old) | set(new)):
        if old.get(key, "<unset>") != new.get(key, "<unset>"):
            return f"option {key} ({_short(old.get(key))} in the checkpoint, {_short(new.get(key))} now)"
    for part, words in (("model", "model"), ("runtime", "device/dtype")):
        a, b = saved.get(part, {}), current.get(part, {})
        for key in sorted(set(a) | set(b), key=lambda k: (k != "source", k)):
            if a.get(key) != b.get(key):
                what = "config (config.json hash)" if key == "config_sha256" else key
                return f"{words} {what} ({_short(a.get(key))} in the checkpoint, {_short(b.get(key))} now)"
    a, b = saved.get("calibration", {}), current.get("calibration", {})
    if a != b:
        if a.get("shape") != b.get("shape"):
            return f"calibration windows ({_shape(a)} in the checkpoint, {_shape(b)} now)"
        return "calibration token ids (same shape, different text, tokenizer or seed)"
    return None


def _shape(part: dict[str, Any]) -> str:
    shape = part.get("shape")
    return "none" if shape is None else f"{shape[0]} x {shape[1]} tokens"


# ------------------------------------------------------------------------------------------------- the files


def _atomic(path: Path, write) -> None:
    """Call ``write(tmp_path)`` and rename the result to ``path``; nothing is left behind on any failure."""
    fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


#: prefix of the files allocators keep in a checkpoint (``save_tensors``)
ALLOCATOR_PREFIX = "allocator-"


def allocator_file(name: str) -> str:
    return f"{ALLOCATOR_PREFIX}{name}.safetensors"


def allocator_json(name: str) -> str:
    return f"{ALLOCATOR_PREFIX}{name}.json"


def block_file(index: int, generation: int) -> str:
    return f"block-{index:05d}-g{generation}.safetensors"


def activations_file(index: int) -> str:
    return f"activations-{index:05d}.safetensors"


def _record_to_dict(record) -> dict[str, Any]:
    data = asdict(record)
    data["shape"] = list(data["shape"])
    return data


def _record_from_dict(data: dict[str, Any]):
    from .runner import LayerRecord

    return LayerRecord(data["name"], data["block"], tuple(data["shape"]), data["target"], data["zeros"],
                       data["numel"], list(data.get("notes", [])))


class Checkpoint:
    """One run's checkpoint directory (see the module docstring). ``progress`` is the saved state to resume
    from, or None for a fresh run."""

    def __init__(self, directory: Path, fingerprint: dict[str, Any], progress: dict[str, Any] | None):
        self.directory = directory
        self.fingerprint = fingerprint
        self.progress = progress
        self._resumed = progress is not None
        self.generation = int(progress.get("generation", 0)) if progress else 0  # commits made so far
        self._pending: dict[int, str] = {}  # blocks saved since the last commit -> their files
        self._lock: int | None = None  # the descriptor holding LOCK while this run uses the directory
        self._made_directory = False  # open() created it: close() removes it again if nothing was saved

    # -------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, directory: str | Path, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        """Validate ``directory`` for a fresh run (must be empty or absent) or a resume (must hold a checkpoint
        whose fingerprint matches); raises a one-line CheckpointError otherwise. Nothing heavy happens here."""
        path = Path(directory).expanduser().resolve()
        if path.exists() and not path.is_dir():
            raise CheckpointError(f"checkpoint dir {path} exists and is not a directory")
        progress_file = path / PROGRESS
        if resume and not progress_file.is_file():
            raise CheckpointError(f"--resume: {path} holds no checkpoint ({PROGRESS} is missing); "
                                  "run without --resume to start one there")
        _check_writable(path)
        made = not path.exists()
        lock_existed = (path / LOCK).exists()
        try:
            path.mkdir(parents=True, exist_ok=True)
            lock = locking.try_lock(path / LOCK)
        except OSError as exc:
            raise CheckpointError(f"cannot write the checkpoint to {path}: {reason(exc)}") from None
        if lock is None:
            raise CheckpointError(f"checkpoint dir {path} is in use by another mrprune run; wait for it to end, "
                                  "or choose another --checkpoint-dir")
        try:
            checkpoint = cls._open_locked(path, fingerprint, resume)
        except BaseException:  # refused: leave the directory as it was found
            if not lock_existed:
                (path / LOCK).unlink(missing_ok=True)
            locking.release(lock)
            if made:
                with contextlib.suppress(OSError):
                    path.rmdir()
            raise
        checkpoint._lock, checkpoint._made_directory = lock, made
        return checkpoint

    @classmethod
    def _open_locked(cls, path: Path, fingerprint: dict[str, Any], resume: bool) -> Checkpoint:
        progress_file = path / PROGRESS
        entries = [p for p in path.iterdir() if p.name != LOCK]
        if not resume:
            if progress_file.is_file():
                raise CheckpointError(
                    f"checkpoint dir {path} holds the checkpoint of an earlier run; pass --resume to continue it, "
                    "or choose an empty --checkpoint-dir"
                )
            foreign = [p for p in entries if not _ours(p)]
            if foreign:
                raise CheckpointError(f"checkpoint dir {path} is not empty and holds no mrprune checkpoint "
                                      f"(e.g. {foreign[0].name}); choose an empty or new --checkpoint-dir")
            for leftover in entries:  # files of a run stopped before its first progress.json: nothing to resume
                leftover.unlink(missing_ok=True)
            return cls(path, fingerprint, None)
        try:
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
            saved = progress["fingerprint"]
            if not isinstance(saved, dict):
                raise TypeError("its fingerprint is not a mapping")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"cannot read the checkpoint {progress_file}: {exc}") from None
        differs = mismatch(saved, fingerprint)
        if differs is not None:
            raise CheckpointError(
                f"checkpoint in {path} was made by a different run: {differs}; resume with the original options, "
                "or start afresh in an empty --checkpoint-dir"
            )
        for stale in path.glob(_TMP_PREFIX + "*"):  # half-written files of the interrupted run
            stale.unlink(missing_ok=True)
        checkpoint = cls(path, fingerprint, progress)
        checkpoint._remove_unnamed_blocks()  # saved after the last commit: the resume saves them again
        log.info("resuming from %s (%s)", path, describe(progress))
        return checkpoint

    @property
    def resuming(self) -> bool:
        """True when this run continues a saved one (fixed when opened; saving progress does not change it)."""
        return self._resumed

    @property
    def saved(self) -> bool:
        """Whether a resumable progress file is on disk: also in the instant between writing it and knowing it."""
        return self.progress is not None or (self.directory / PROGRESS).exists()

    def stage(self) -> str | None:
        return None if self.progress is None else self.progress.get("stage")

    # ---------------------------------------------------------------------------------------------- saving
    def save_blocks(self, adapter: ModelAdapter, blocks: Iterable[int]) -> None:
        """Write the linear weights of ``blocks`` (each its own file, atomically), under the names of the next
        commit, which adopts them; until then the files of the last commit stay as they were."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        for index in blocks:
            tensors = {f"{ref.name}.weight": ref.stored.detach().to("cpu").contiguous()
                       for ref in adapter.linear_layers(index)}
            name = block_file(index, self.generation + 1)
            _atomic(self.directory / name, lambda tmp, tensors=tensors: save_file(tensors, tmp))
            self._pending[index] = name

    def save_activations(self, index: int, hidden: torch.Tensor) -> None:
        """Write the calibration activations entering block ``index``."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensor = hidden.detach().to("cpu").contiguous()
        _atomic(self.directory / activations_file(index), lambda tmp: save_file({"hidden": tensor}, tmp))

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write an allocator's own tensors (e.g. fast MRP's pilot curves), atomically."""
        from safetensors.torch import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        tensors = {key: t.detach().to("cpu").contiguous() for key, t in tensors.items()}
        _atomic(self.directory / allocator_file(name), lambda tmp: save_file(tensors, tmp))

    def save_json(self, name: str, data: dict[str, Any]) -> None:
        """Write an allocator's own record (e.g. ``auto``'s candidates measured so far), atomically."""
        self.directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(data, indent=1) + "\n"
        _atomic(self.directory / allocator_json(name), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def load_json(self, name: str) -> dict[str, Any] | None:
        """What :meth:`save_json` wrote under ``name``, or None if nothing was."""
        path = self.directory / allocator_json(name)
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None

    def restart(self) -> None:
        """Forget the saved progress: the pruning pass that follows starts from block 0 (``auto`` resumed while it
        was still measuring candidates, so its final pass had not begun)."""
        self.progress = None
        self._resumed = False

    def load_tensors(self, name: str) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.directory / allocator_file(name)
        try:
            return load_file(path)
        except (OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None

    def commit(self, stage: str, blocks_saved: Iterable[int], next_block: int | None = None,
               activations: int | None = None, records: list | None = None,
               state: dict[str, Any] | None = None) -> None:
        """Write ``progress.json`` (last, atomically), then remove block and activation files it does not name."""
        saved = sorted(set(blocks_saved))
        files = {**self._block_files(), **{str(i): name for i, name in self._pending.items()}}
        missing = [i for i in saved if str(i) not in files]
        if missing:
            raise RuntimeError(f"commit names blocks {missing} that were never saved")  # a bug, not a user error
        progress = {
            "format": FORMAT,
            "stage": stage,
            "generation": self.generation + 1,
            "next_block": next_block,
            "activations": None if activations is None else activations_file(activations),
            "block_files": {str(i): files[str(i)] for i in saved},  # the saved blocks and their files
            "records": None if records is None else [_record_to_dict(r) for r in records],
            "state": state or {},
            "fingerprint": self.fingerprint,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        }
        text = json.dumps(progress, indent=1) + "\n"
        self.directory.mkdir(parents=True, exist_ok=True)  # auto commits before any block is saved
        _atomic(self.directory / PROGRESS, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        # known in memory at once: an interruption during the clean-up below must still say progress is saved
        self.progress = progress
        self.generation += 1
        self._pending.clear()
        for old in self.directory.glob("activations-*.safetensors"):
            if old.name != progress["activations"]:
                old.unlink(missing_ok=True)
        self._remove_unnamed_blocks()

    def _block_files(self) -> dict[str, str]:
        """Block index (as text) -> file, as the last commit named them."""
        return dict((self.progress or {}).get("block_files") or {})

    def _remove_unnamed_blocks(self) -> None:
        named = set(self._block_files().values()) | set(self._pending.values())
        for path in self.directory.glob("block-*.safetensors"):
            if path.name not in named:
                path.unlink(missing_ok=True)

    # --------------------------------------------------------------------------------------------- loading
    def restore_weights(self, adapter: ModelAdapter, before_write=None) -> list[int]:
        """Copy the saved weights of every saved block into the model (``before_write(index)`` first, if given);
        returns the blocks restored."""
        from safetensors.torch import load_file

        files = self._block_files()
        blocks = sorted(int(index) for index in files)
        for index in blocks:
            path = self.directory / files[str(index)]
            try:
                tensors = load_file(path)
            except (OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"cannot read {path}: {exc}") from None
            if before_write is not None:
                before_write(index)
            for ref in adapter.linear_layers(index):
                saved = tensors.get(f"{ref.name}.weight")
                if saved is None or saved.shape != ref.stored.shape:
                    raise CheckpointError(f"{path} does not hold the weight of {ref.name} as this model has it")
                ref.stored.copy_(saved)
        return blocks

    def load_activations(self) -> torch.Tensor:
        from safetensors.torch import load_file

        name = self.progress.get("activations") if self.progress else None
        if not name:
            raise CheckpointError(f"the checkpoint in {self.directory} holds no activations to resume from")
        try:
            return load_file(self.directory / name)["hidden"]
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise CheckpointError(f"cannot read {self.directory / name}: {exc}") from None

    def records(self) -> list:
        return [_record_from_dict(r) for r in (self.progress or {}).get("records") or []]

    def remove(self) -> None:
        """Delete the checkpoint's files (the directory itself stays when it holds anything else)."""
        for path in self.directory.iterdir():
            if path.name == PROGRESS or _ours(path):
                path.unlink(missing_ok=True)
        self._release()
        with contextlib.suppress(OSError):
            self.directory.rmdir()

    def close(self) -> None:
        """The run is done with the directory: let another run use it. A directory this run created and saved
        nothing in goes again."""
        if self._lock is None:
            return
        self._release()
        if self._made_directory:
            with contextlib.suppress(OSError):
                self.directory.rmdir()  # only if empty

    def _release(self) -> None:
        """Remove the lock file while still holding it, then drop the lock (``locking.try_lock`` tells a lock
        taken on the removed file from the one at the path)."""
        if self._lock is not None:
            (self.directory / LOCK).unlink(missing_ok=True)
            locking.release(self._lock)
            self._lock = None


def _ours(path: Path) -> bool:
    """A file a checkpoint writes (besides progress.json)."""
    return path.is_file() and (path.name.startswith(_TMP_PREFIX) or (
        path.name.startswith(("block-", "activations-", ALLOCATOR_PREFIX)) and path.suffix == ".safetensors")
        or (path.name.startswith(ALLOCATOR_PREFIX) and path.suffix == ".json"))


def describe(progress: dict[str, Any]) -> str:
    stage = progress.get("stage")
    state = progress.get("state") or {}
    if progress.get("next_block") is not None:
        return f"{stage}, next block {progress['next_block']}"
    if "auto" in state:  # --allocation auto while it measures its candidates
        measured = [c["allocation"] for c in state["auto"].get("candidates", [])]
        chosen = state["auto"].get("chosen")
        return (f"auto, {len(measured)} candidate(s) measured ({', '.join(measured) or 'none'})"
                + (f", {chosen} chosen" if chosen else ""))
    return f"{stage}, {len(state.get('trace', []))} iterations done"


def _check_writable(path: Path) -> None:
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise CheckpointError(f"cannot write the checkpoint to {path} (permission denied at {parent})")


__all__ = ["Checkpoint", "fingerprint", "mismatch"]
