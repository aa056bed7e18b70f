"""The record of a pruning run: what was asked, what was measured, how long it took; as JSON and as text."""

from __future__ import annotations

import datetime
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from .runner import LayerRecord

#: layer notes (e.g. SparseGPT's raised dampening) printed in the text report; all are in the JSON report
NOTES_SHOWN = 5
REPORT_FILE = "mrprune_report.json"


def versions() -> dict[str, str | None]:
    from . import __version__
    from .models.loading import installed_version

    return {
        "mrprune": __version__,
        "python": sys.version.split()[0],
        "torch": installed_version("torch"),
        "transformers": installed_version("transformers"),
        "platform": platform.platform(),
    }


def sparsity_summary(records: list[LayerRecord], target: float) -> dict[str, Any]:
    """Global sparsity over all decoder linear weights, and whether it meets the target to within one weight
    row per layer (the rounding a per-row metric cannot avoid)."""
    zeros = sum(r.zeros for r in records)
    weights = sum(r.numel for r in records)
    deviation = zeros - target * weights
    tolerance = sum(r.shape[1] for r in records)
    return {
        "target": target,
        "achieved": zeros / weights if weights else 0.0,
        "zeros": zeros,
        "weights": weights,
        "deviation_weights": round(deviation, 3),
        "tolerance_weights": tolerance,
        "target_met": abs(deviation) <= tolerance,
    }


def selection_scores(selection: dict[str, Any]) -> str:
    """``--allocation auto``'s candidates with their held-out perplexity, as the summaries print them."""
    return ", ".join(f"{c['allocation']} {c['heldout_perplexity']:.4g}" for c in selection["candidates"])


def block_summary(records: list[LayerRecord], block_targets: list[float]) -> list[dict[str, Any]]:
    rows = []
    for index, target in enumerate(block_targets):
        mine = [r for r in records if r.block == index]
        weights = sum(r.numel for r in mine)
        rows.append({
            "index": index,
            "target": round(target, 6),
            "sparsity": sum(r.zeros for r in mine) / weights if weights else 0.0,
            "weights": weights,
        })
    return rows


@dataclass
class PruneReport:
    model: dict[str, Any]
    settings: dict[str, Any]
    allocation: dict[str, Any]
    sparsity: dict[str, Any]
    blocks: list[dict[str, Any]]
    layers: list[dict[str, Any]]
    timings_s: dict[str, float] = field(default_factory=dict)
    memory_mib: dict[str, float | None] = field(default_factory=dict)
    perplexity: dict[str, Any] = field(default_factory=dict)
    zeroshot: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, str | None] = field(default_factory=versions)
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat())
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(cls, model: dict, settings: dict, allocation, records: list[LayerRecord], **kwargs) -> PruneReport:
        return cls(
            model=model,
            settings=settings,
            allocation={
                "method": allocation.method,
                "target": allocation.target,
                "block_targets": [round(t, 6) for t in allocation.block_targets],
                **allocation.details,
            },
            sparsity=sparsity_summary(records, allocation.target),
            blocks=block_summary(records, allocation.block_targets),
            layers=[
                {"name": r.name, "block": r.block, "shape": list(r.shape), "target": round(r.target, 6),
                 "sparsity": r.sparsity, "zeros": r.zeros, **({"notes": r.notes} if r.notes else {})}
                for r in records
            ],
            **kwargs,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "versions": self.versions,
            "model": self.model,
            "settings": self.settings,
            "seed": self.settings.get("calibration", {}).get("seed"),
            "allocation": self.allocation,
            "sparsity": self.sparsity,
            "blocks": self.blocks,
            "layers": self.layers,
            "perplexity": self.perplexity,
            **({"zeroshot": self.zeroshot} if self.zeroshot else {}),
            "timings_s": self.timings_s,
            "memory_mib": self.memory_mib,
            **self.extra,
        }

    def format_text(self) -> str:
        s = self.sparsity
        settings = self.settings
        lines = [
            f"model      {self.model.get('source')} ({self.model.get('family')}, {self.model.get('blocks')} blocks, "
            f"{self.model.get('decoder_linear_weights', 0) / 1e6:.1f}M decoder linear weights)",
            f"pruning    {settings.get('metric')}, pattern {settings.get('pattern')}, "
            f"allocation {self.allocation.get('method')}",
            "",
            "block  target   achieved",
        ]
        lines += [f"{b['index']:>5}  {b['target']:.4f}   {b['sparsity']:.4f}" for b in self.blocks]
        if "allocation_selection" in self.extra:
            sel = self.extra["allocation_selection"]
            lines += ["", f"chosen     {sel['chosen']} by held-out perplexity: {selection_scores(sel)}",
                      f"           ({sel['protocol']})"]
        lines += [
            "",
            f"global sparsity {s['achieved']:.6f} (target {s['target']:.6f}, {s['zeros']} of {s['weights']} weights; "
            f"off by {signed(s['deviation_weights'])} weights, tolerance one row per layer = {s['tolerance_weights']}: "
            f"{'met' if s['target_met'] else 'NOT MET'})",
        ]
        if "experts" in self.extra:
            e = self.extra["experts"]
            t = e["calibration_tokens"]
            lines.append(f"experts    {e['experts']} in {e['blocks']} blocks; calibration tokens per expert min {t['min']}, "
                         f"median {t['median']}, max {t['max']}; {e['without_tokens']} without any (pruned by |W|)")
        noted = [(layer["name"], note) for layer in self.layers for note in layer.get("notes", [])]
        for name, note in noted[:NOTES_SHOWN]:
            lines.append(f"note       {name}: {note}")
        if len(noted) > NOTES_SHOWN:
            lines.append(f"note       ... and {len(noted) - NOTES_SHOWN} more (per layer in {REPORT_FILE})")
        for when in ("before", "after"):
            if when in self.perplexity:
                p = self.perplexity[when]
                lines.append(f"perplexity {when:<6} {p['perplexity']:.3f}  ({p['protocol']})")
        if self.zeroshot:
            from .evaluate.zeroshot import zeroshot_markdown

            lines += ["", zeroshot_markdown(self.zeroshot), ""]
        if self.timings_s:
            lines.append("time (s)   " + ", ".join(f"{k} {v:.1f}" for k, v in self.timings_s.items()))
        return "\n".join(lines)


def signed(count: float) -> str:
    """A deviation in weights as the JSON holds it (3 decimals: a target of 0.6 x 110592 weights is not whole),
    with its sign, never '-0'."""
    text = f"{count:+.3f}".rstrip("0").rstrip(".")
    return "+0" if text == "-0" else text
