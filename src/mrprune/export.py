"""Writing a pruned model that plain ``AutoModelForCausalLM.from_pretrained`` loads.

The directory is written atomically: everything goes to a hidden temporary sibling which is renamed into
place only when complete, so a crash leaves nothing half-written. The input model is never written to.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from .errors import OutputError, ResourceError
from .models.loading import strip_gguf_quantizer

log = logging.getLogger(__name__)

REPORT_NAME = "mrprune_report.json"
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


def check_output(output: str | Path, overwrite: bool, source_dir: Path | None,
                 needed_bytes: int | None = None, size_detail: str = "") -> Path:
    """Validate the output directory before any heavy work; returns its absolute path. With ``needed_bytes``
    also check that its filesystem has room for the export (the old directory is replaced only at the end, so
    an overwritten export still needs the full room)."""
    out = Path(output).expanduser().resolve()
    if source_dir is not None:
        src = Path(source_dir).resolve()
        if _inside(out, src):
            raise OutputError(f"output {out} is inside the input model directory {src}; choose another place")
        if _inside(src, out):
            raise OutputError(f"output {out} contains the input model {src}; choose another place")
    if out.exists():
        if not out.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        if not overwrite and any(out.iterdir()):
            raise OutputError(f"output directory {out} already exists; pass --overwrite to replace it")
    parent = existing_ancestor(out.parent)
    if not os.access(parent, os.W_OK):
        raise OutputError(f"cannot write to {parent} (permission denied)")
    if needed_bytes is not None:
        check_disk(out, needed_bytes, "the export", size_detail)
    return out


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, default=str) + "\n", encoding="utf-8")


def export_model(model, tokenizer, output: str | Path, report: dict[str, Any], overwrite: bool,
                 source_dir: Path | None = None) -> Path:
    """Save safetensors weights, config, tokenizer and ``mrprune_report.json`` to ``output`` atomically.

    The report's ``timings_s`` gains the export's own duration before it is written."""
    out = check_output(output, overwrite, source_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    if getattr(model, "hf_quantizer", None) is not None:
        strip_gguf_quantizer(model)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        start = time.perf_counter()
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        report.setdefault("timings_s", {})["export"] = round(time.perf_counter() - start, 3)
        write_json(tmp / REPORT_NAME, report)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("wrote %s", out)
    return out
