"""Writing a pruned model that plain ``AutoModelForCausalLM.from_pretrained`` loads.

The directory is written atomically: everything goes to a hidden temporary sibling which is renamed into
place only when complete, so a crash leaves nothing half-written. The input model is never written to.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import locking
from .card import model_card
from .errors import OutputError, ResourceError, reason
from .models.loading import strip_gguf_quantizer

log = logging.getLogger(__name__)

REPORT_NAME = "mrprune_report.json"
CARD_NAME = "README.md"
#: the export's size beyond its weights (tokenizer, config, report, safetensors headers), as a fraction
EXPORT_OVERHEAD = 0.10


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def existing_ancestor(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def export_bytes(parameters: int, dtype_size: int) -> int:
    """Estimated size of an export: every parameter once in the run's dtype, plus 10%."""
    return int(parameters * dtype_size * (1 + EXPORT_OVERHEAD))


def check_disk(path: str | Path, needed: int, what: str, detail: str = "") -> None:
    """Refuse (ResourceError, both numbers) when the filesystem of ``path`` has less than ``needed`` bytes free."""
    where = existing_ancestor(Path(path).expanduser().resolve())
    free = shutil.disk_usage(where).free
    if needed > free:
        from .preflight import gib

        raise ResourceError(
            f"not enough free disk for {what} at {where}: it needs about {gib(needed)}"
            f"{f' ({detail})' if detail else ''} but {gib(free)} is free; free some space or choose another place"
        )


def input_paths(*models) -> list[Path]:
    """The files and directories a job reads its models from (a path given, or an in-memory model's source
    directory): outputs may neither be written inside them nor replace a directory that holds them."""
    paths = []
    for model in models:
        if model is None:
            continue
        if isinstance(model, (str, Path)):
            path: Path | None = Path(model).expanduser()
        else:
            name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
            path = Path(name) if name else None
        if path is not None and path.exists():
            paths.append(path.resolve())
    return paths


def check_clear_of_inputs(out: Path, protect: Path | Sequence[Path | None] | None) -> None:
    """An output (file or directory) may neither be an input model, nor lie in an input's directory, nor hold
    an input (replacing it would delete the input)."""
    protected = [protect] if isinstance(protect, (str, Path)) else list(protect or [])
    for path in (Path(p).resolve() for p in protected if p is not None):
        if out == path or (path.is_dir() and _inside(out, path)):
            raise OutputError(f"output {out} is inside the input model directory {path}; choose another place")
        if _inside(path, out):
            raise OutputError(f"output {out} contains the input model {path}; choose another place")


def check_output(output: str | Path, overwrite: bool, protect: Path | Sequence[Path | None] | None,
                 needed_bytes: int | None = None, size_detail: str = "", marker: str = REPORT_NAME) -> Path:
    """Validate the output directory before any heavy work; returns its absolute path.

    ``protect``: the input model's directory or file(s), which the output may neither sit in nor contain.
    ``--overwrite`` replaces only an earlier output of ours (one holding ``marker``), so a mistyped path can
    never delete a directory of other files. With ``needed_bytes`` also check that its filesystem has room for
    the export (the old directory is replaced only at the end, so an overwritten export needs the full room)."""
    out = Path(output).expanduser().resolve()
    check_clear_of_inputs(out, protect)
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        if any(out.iterdir()):
            if not overwrite:
                raise OutputError(f"output directory {out} already exists; pass --overwrite to replace it")
            if not (out / marker).exists():
                raise OutputError(f"output directory {out} holds files mrprune did not write (no {marker}); "
                                  "--overwrite replaces only an earlier mrprune output: choose another place")
    check_parent(out)
    if needed_bytes is not None:
        check_disk(out, needed_bytes, "the export", size_detail)
    return out


def check_parent(out: Path) -> None:
    """The nearest existing directory above the output ``out`` (a file or a directory) can take it."""
    parent = existing_ancestor(out.parent)
    if not parent.is_dir():
        raise OutputError(f"cannot create output {out}: {parent} is a file, not a directory")
    check_writable(parent)


def check_writable(directory: Path) -> None:
    """Create (and remove) a directory in ``directory``, the way the export will: a permission check alone
    passes for root where nothing can be written (/proc, a read-only bind mount)."""
    try:
        probe = tempfile.mkdtemp(prefix=".mrprune-probe-", dir=directory)
    except OSError as exc:
        raise OutputError(f"cannot write to {directory}: creating a directory there fails ({reason(exc)})") from None
    os.rmdir(probe)


def _umask() -> int:
    """The process's umask: read from /proc where Linux shows it (setting it to read it back races with any
    thread creating a file meanwhile), else by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish_mode(path: Path, directory: bool) -> None:
    """Give a file or directory made by mkstemp/mkdtemp (private, 0600/0700) the mode the user's umask gives
    any new file, so a shared output is readable by whoever could read the user's other files."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


def write_dir_atomically(out: Path, fill: Callable[[Path], None], *, overwrite: bool) -> Path:
    """``fill`` a hidden temporary sibling of ``out``, then rename it into place (replacing an old ``out``
    only once the new one is complete): a crash leaves either the old directory or the new one, never half.
    An interrupt that comes while the renames run is held until they are done; it then carries
    ``output_written`` so the interruption message can say the output is complete.

    The swap holds a lock on the parent directory, so runs started side by side with the same output swap one
    after the other; without ``overwrite``, one that finds ``out`` filled meanwhile by another run replaces
    nothing and keeps its complete result in a sibling, named in the one-line error."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        publish_mode(tmp, directory=True)
        fill(tmp)
        with locking.held(out.parent, directory=True):
            if not overwrite and out.exists() and (not out.is_dir() or any(out.iterdir())):
                kept = Path(tempfile.mkdtemp(prefix=f"{out.name}.mrprune-", dir=out.parent))
                os.replace(tmp, kept)
                raise OutputError(f"output {out} was written by another run meanwhile; nothing was replaced, and "
                                  f"this run's complete output is in {kept}")
            try:
                with deferred_signals():
                    _swap_in(tmp, out)
            except KeyboardInterrupt as exc:
                if not tmp.exists():  # the new directory is in place
                    exc.output_written = str(out)  # type: ignore[attr-defined]
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an old ``out`` goes aside first and is removed once the new one is in, or is
    put back if that fails."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
    try:
        os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        if (old / out.name).exists() and not out.exists():
            os.replace(old / out.name, out)  # the old one back
        if not (old / out.name).exists():
            shutil.rmtree(old, ignore_errors=True)
        else:  # never delete the only copy
            log.error("the previous %s is kept in %s", out.name, old)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def deferred_signals():
    """SIGINT and SIGTERM held back while a few file operations that must not be split run; a signal that came
    meanwhile goes to its own handler as soon as they are done. Python runs signal handlers in the main thread
    whichever thread the signal reached, so the handlers are swapped (from the main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: received.append(signum))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if received:
            handler = previous[received[0]]
            if callable(handler):
                handler(received[0], None)  # e.g. KeyboardInterrupt, or the command line's SIGTERM unwinding
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), received[0])


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def export_model(model, tokenizer, output: str | Path, report: dict[str, Any], overwrite: bool,
                 protect: Path | Sequence[Path | None] | None = None, base_model: str | None = None) -> Path:
    """Save safetensors weights, config, tokenizer, ``mrprune_report.json`` and a model card (README.md,
    naming ``base_model`` when the source has a hub id) to ``output`` atomically.

    The report's ``timings_s`` gains the export's own duration before it is written."""
    out = check_output(output, overwrite, protect)
    if getattr(model, "hf_quantizer", None) is not None:
        strip_gguf_quantizer(model)

    def fill(tmp: Path) -> None:
        start = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.setdefault("timings_s", {})["export"] = round(time.perf_counter() - start, 3)
        write_json(tmp / REPORT_NAME, report)
        (tmp / CARD_NAME).write_text(model_card(report, base_model), encoding="utf-8")

    return write_dir_atomically(out, fill, overwrite=overwrite)
