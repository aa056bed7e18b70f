"""The model card (README.md) of an exported model: what was done to which model and what it measured.

A pruned model is usually shared (on the hub, or in a team's storage) without the command that made it; the
card says it in the form the hub reads (YAML front matter: base model, library, tags) and in words: method,
sparsity, calibration, quality with its protocol, per-block sparsity, and the job's settings as a
``--config`` file that reproduces it. Everything comes from the run's report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from .report import selection_scores


def model_card(report: dict[str, Any], base_model: str | None = None) -> str:
    """README.md text for an export whose ``mrprune_report.json`` is ``report``; ``base_model`` is the source's
    hub id, when it has one (the hub links the two)."""
    settings = report.get("settings", {})
    s, allocation, model = report["sparsity"], report["allocation"], report.get("model", {})
    metric, pattern = settings.get("metric"), settings.get("pattern")
    front: dict[str, Any] = {"library_name": "transformers"}
    if base_model:
        front["base_model"] = base_model
    front["tags"] = ["mrprune", "pruned", "sparse", str(metric)]
    calibration = settings.get("calibration", {})
    rows = [
        ("source model", f"`{model.get('source')}` ({model.get('class')}, {model.get('blocks')} blocks)"),
        ("metric", str(metric)),
        ("pattern", str(pattern)),
        ("allocation", _allocation_text(allocation, report.get("allocation_selection"))),
        ("global sparsity", (f"{s['achieved']:.6f} of {s['weights']:,} decoder linear weights (target "
                            f"{s['target']:.6f}; embeddings and LM head are not pruned)")),
        ("calibration", (f"{calibration.get('nsamples')} x {calibration.get('seqlen')} tokens from "
                        f"{calibration.get('source') or 'the default source'}, seed {calibration.get('seed')}")),
    ]
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             f"# {model.get('class', 'Model')} pruned to {s['achieved']:.1%} sparsity",
             "",
             (f"Pruned after training, without retraining, by mrprune {report.get('versions', {}).get('mrprune', '')}. "
             "The pruned weights are stored as exact zeros in ordinary dense tensors, so the model loads with "
             "`AutoModelForCausalLM.from_pretrained` like its source; `mrprune_report.json` has every layer's "
             "figures."),
             "", "| | |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    quality = _quality(report)
    if quality:
        lines += ["", "## Quality", "", *quality]
    lines += ["", "## Sparsity per block", "", "| block | target | achieved |", "|---:|---:|---:|"]
    lines += [f"| {b['index']} | {b['target']:.4f} | {b['sparsity']:.4f} |" for b in report.get("blocks", [])]
    job = {k: v for k, v in settings.items() if k not in ("output", "overwrite")}
    given = "" if job.get("model") else " (the model was given as an object: set `model:` to its path or hub id)"
    lines += ["", "## Reproduce", "", (f"The job's settings{given}; save them as `job.yaml` and run "
              "`mrprune prune --config job.yaml --output DIR` (paths in them are as they were given to the job, "
              "relative to the folder it ran in):"), "", "```yaml",
              yaml.safe_dump(job, sort_keys=False).strip(), "```", ""]
    v = report.get("versions", {})
    lines.append(f"Made with mrprune {v.get('mrprune')}, torch {v.get('torch')}, transformers "
                 f"{v.get('transformers')}, Python {v.get('python')} on {report.get('created', '')[:10]}.")
    return "\n".join(lines) + "\n"


def _allocation_text(allocation: dict[str, Any], selection: dict[str, Any] | None) -> str:
    text = str(allocation.get("method"))
    if selection:
        text += (f", chosen by `--allocation auto` (held-out perplexity: {selection_scores(selection)}; "
                 f"{selection['protocol']})")
    return text


def _quality(report: dict[str, Any]) -> list[str]:
    lines = []
    ppl = report.get("perplexity") or {}
    if "after" in ppl:
        before = f"{ppl['before']['perplexity']:.3f} before pruning, " if "before" in ppl else ""
        lines.append(f"Perplexity: {before}{ppl['after']['perplexity']:.3f} after ({ppl['after']['protocol']}).")
    if report.get("zeroshot"):
        from .evaluate.zeroshot import zeroshot_markdown

        lines += [""] if lines else []
        lines += ["Zero-shot, after pruning:", "", zeroshot_markdown(report["zeroshot"])]
    return lines


def hub_id(identity: str | None) -> str | None:
    """``identity`` if it names a hub repository (``org/name``, not a path on this machine), else None."""
    if not identity or not re.fullmatch(r"[\w.-]+/[\w.-]+", identity) or Path(identity).exists():
        return None
    return identity
