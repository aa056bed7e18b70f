"""All matplotlib code of the analyses. matplotlib is optional (``pip install 'mrprune[plot]'``) and imported
only here, only when a plot is drawn. Figures are built with the object API on the Agg canvas, never through
pyplot, so no global backend or figure state is touched (safe in notebooks and threads)."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..errors import OutputError

MISSING = "plots need matplotlib: pip install 'mrprune[plot]'"
DPI = 150


def require() -> None:
    """Fail early (before any heavy work) when matplotlib is missing."""
    _figure_class()


def _figure_class():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise OutputError(MISSING) from None
    return Figure, FigureCanvasAgg


def _new_figure(rows: int = 1, cols: int = 1, size: tuple[float, float] = (8.0, 4.5), **kwargs):
    Figure, Canvas = _figure_class()
    fig = Figure(figsize=size, layout="constrained")
    Canvas(fig)
    return fig, fig.subplots(rows, cols, squeeze=False, **kwargs)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI, format="png")


def _title(fig, title: str, subtitle: str | None) -> None:
    """Title and subtitle, wrapped so that long model names and protocols stay inside the figure."""
    width = int(fig.get_figwidth() * 11)
    lines = textwrap.wrap(title, width) + (textwrap.wrap(subtitle, int(width * 1.1)) if subtitle else [])
    fig.suptitle("\n".join(lines), fontsize=10)


def value_scale(values: Sequence[float]) -> tuple[str, dict]:
    """'linear'; 'log' when all values are positive and span two decades or more; 'symlog' when they span
    decades on both sides of 0 (e.g. a few small negative perplexity changes, which are noise): linear inside
    +-linthresh, a power of ten near the low end of the magnitudes, so small values do not take the axis."""
    finite = [v for v in values if math.isfinite(v)]
    magnitudes = sorted(abs(v) for v in finite if v != 0)
    if not magnitudes or magnitudes[-1] / magnitudes[0] < 100:
        return "linear", {}
    if all(v > 0 for v in finite):
        return "log", {}
    low = magnitudes[len(magnitudes) // 10]
    return "symlog", {"linthresh": 10.0 ** math.floor(math.log10(low)), "linscale": 0.5}


def _scale_note(scale: str, kwargs: dict) -> str:
    if scale == "log":
        return " (log)"
    return f" (log, linear within ±{kwargs['linthresh']:g})" if scale == "symlog" else ""


def lps_plot(path: Path, blocks: Sequence[int], curves: dict[str, Sequence[float]], title: str,
             subtitle: str) -> None:
    """x: block index, y: perplexity increase over dense, one line per metric."""
    fig, axes = _new_figure()
    ax = axes[0][0]
    for name, values in curves.items():
        ax.plot(list(blocks), list(values), marker="o", markersize=3.5, linewidth=1.4, label=name)
    values = [v for line in curves.values() for v in line]
    scale, kwargs = value_scale(values)
    ax.set_yscale(scale, **kwargs)
    if min(values) < 0:
        ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("block index (only this block pruned)")
    ax.set_ylabel("perplexity increase over dense" + _scale_note(scale, kwargs))
    if len(blocks) <= 40:
        ax.set_xticks(list(blocks))
        ax.tick_params(axis="x", labelsize=7 if len(blocks) > 20 else 9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(title="metric")
    _title(fig, title, subtitle)
    _save(fig, path)


def redundancy_plot(path: Path, ratios: Sequence[float], title: str, subtitle: str) -> None:
    """One bar per block. The y axis is zoomed to the data (ratios sit close to 1), which the label says."""
    fig, axes = _new_figure()
    ax = axes[0][0]
    blocks = list(range(len(ratios)))
    lo, hi = min(ratios), max(ratios)
    pad = max((hi - lo) * 0.15, 1e-4)
    bottom = max(0.0, lo - pad)
    ax.bar(blocks, [r - bottom for r in ratios], bottom=bottom, color="tab:blue", width=0.8)
    mean = sum(ratios) / len(ratios)
    ax.axhline(mean, color="tab:red", linestyle="--", linewidth=1, label=f"mean {mean:.4f}")
    ax.set_ylim(bottom, min(1.0, hi + pad) if hi + pad > bottom else hi + pad)
    ax.set_xlabel("block index")
    ax.set_ylabel("non-outlier ratio" + (f" (axis from {bottom:.3g})" if bottom > 0 else ""))
    if len(blocks) <= 40:
        ax.set_xticks(blocks)
        ax.tick_params(axis="x", labelsize=7 if len(blocks) > 20 else 9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend()
    _title(fig, title, subtitle)
    _save(fig, path)


def allocation_plot(path: Path, sparsities: dict[str, Sequence[float]], ratios: dict[str, Sequence[float]],
                    target: float, title: str, subtitle: str, spreads: dict[str, float]) -> None:
    """Top: per-block sparsity per allocator. Bottom: the non-outlier ratio each leaves (dense thresholds)."""
    fig, axes = _new_figure(2, 1, size=(8.0, 7.0), sharex=True)
    top, bottom = axes[0][0], axes[1][0]
    for name, values in sparsities.items():
        top.plot(range(len(values)), list(values), marker="o", markersize=3, linewidth=1.4, label=name)
    top.axhline(target, color="grey", linestyle=":", linewidth=1, label=f"target {target:g}")
    top.set_ylabel("block sparsity")
    top.grid(True, alpha=0.3)
    top.legend(title="allocation", fontsize=8)
    for name, values in ratios.items():
        bottom.plot(range(len(values)), list(values), marker="o", markersize=3, linewidth=1.2,
                    label=f"{name} (cv {spreads[name]:.3g})")
    bottom.set_xlabel("block index")
    bottom.set_ylabel("non-outlier ratio after pruning")
    bottom.grid(True, alpha=0.3)
    bottom.legend(fontsize=8)
    n = max(len(v) for v in sparsities.values())
    if n <= 40:
        bottom.set_xticks(range(n))
        bottom.tick_params(axis="x", labelsize=7 if n > 20 else 9)
    _title(fig, title, subtitle)
    _save(fig, path)


def compare_plot(path: Path, sparsities: Sequence[float], series: Mapping[str, Mapping[str, Sequence[float]]],
                 dense: float, title: str, subtitle: str) -> None:
    """One panel per metric: x sparsity, y perplexity, one line per allocation; dense as a dotted line."""
    metrics = list(series)
    fig, axes = _new_figure(1, len(metrics), size=(4.2 * len(metrics) + 1.0, 4.5), sharey=True)
    values = [v for by_alloc in series.values() for line in by_alloc.values() for v in line] + [dense]
    scale, kwargs = value_scale(values)
    for ax, metric in zip(axes[0], metrics):
        for allocation, line in series[metric].items():
            ax.plot(list(sparsities), list(line), marker="o", markersize=4, linewidth=1.4, label=allocation)
        ax.axhline(dense, color="grey", linestyle=":", linewidth=1, label=f"dense {dense:.2f}")
        ax.set_yscale(scale, **kwargs)
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("target sparsity")
        ax.set_xticks(list(sparsities))
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("perplexity" + _scale_note(scale, kwargs))
    axes[0][-1].legend(title="allocation", fontsize=8)
    _title(fig, title, subtitle)
    _save(fig, path)
