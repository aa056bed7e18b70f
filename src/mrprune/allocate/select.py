"""``--allocation auto``: the allocation chosen per job, by held-out perplexity.

No allocation wins on every model (MRP beats uniform on SmolLM2 and loses on Gemma-3 and Qwen2.5-Coder,
BENCHMARKS.md section 3), so ``auto`` prunes once with each candidate, from the same dense weights and
calibration windows, and keeps the one whose pruned model has the lowest perplexity on windows of the
calibration source that calibration did not use (:func:`mrprune.data.sample_with_heldout`). The evaluation
text never takes part in the choice. The orchestration is :func:`choose`; the pruning and the measurement are
the caller's (``mrprune.api``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .base import Allocation, AllocationContext, Allocator

log = logging.getLogger(__name__)


class AutoAllocator(Allocator):
    """Holds the candidates; the job runs them (it prunes several times, so it cannot be a plain allocation)."""

    name = "auto"
    needs_calibration = True  # the held-out windows come from the calibration source

    def __init__(self, candidates: Sequence[Allocator]):
        self.candidates = list(candidates)

    def allocate(self, ctx: AllocationContext) -> Allocation:
        raise TypeError("auto prunes once per candidate; mrprune.prune runs it")

    def check_options(self, target: float | None) -> None:
        for candidate in self.candidates:
            candidate.check_options(target)

    def check_shape(self, ctx: AllocationContext) -> None:
        for candidate in self.candidates:
            candidate.check_shape(ctx)


@dataclass
class CandidateResult:
    allocation: str
    heldout_perplexity: float
    achieved: float
    seconds: float


@dataclass
class Selection:
    chosen: str
    candidates: list[CandidateResult]
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return {"chosen": self.chosen, "protocol": self.protocol,
                "candidates": [asdict(c) for c in self.candidates]}


def choose(names: Sequence[str], prune_with: Callable[[str], float], measure: Callable[[], float],
           restore: Callable[[], None], protocol: str, done: Sequence[CandidateResult] = (),
           on_result: Callable[[list[CandidateResult]], None] | None = None) -> Selection:
    """Prune with each candidate (``prune_with(name)`` returns the global sparsity reached), measure it, restore
    the dense weights; the lowest finite perplexity wins, ties to the earlier candidate. The model is left dense:
    the caller prunes it once more with the winner, so the result is that allocation's own run. Candidates in
    ``done`` (measured by an interrupted run) are not run again; ``on_result`` sees the results after each new
    one (to save them)."""
    known = {c.allocation: c for c in done}
    results = []
    for name in names:
        if name in known:
            results.append(known[name])
            continue
        start = time.perf_counter()
        try:
            achieved = prune_with(name)
            value = measure()
        finally:
            restore()
        results.append(CandidateResult(name, value, achieved, round(time.perf_counter() - start, 3)))
        log.info("auto: %s reaches %.4f, held-out perplexity %.4f", name, achieved, value)
        if on_result is not None:
            on_result(results)
    finite = [r for r in results if math.isfinite(r.heldout_perplexity)]
    best = min(finite, key=lambda r: r.heldout_perplexity) if finite else results[0]
    return Selection(best.allocation, results, protocol)
