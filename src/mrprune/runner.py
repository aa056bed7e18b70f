"""The sequential pass: for each block, statistics from inputs produced by the already-pruned blocks above it,
then pruning, then recomputing its outputs with the pruned weights to feed the next block.

Only the current block needs to be on the accelerator; with ``offload`` the others wait on the CPU, and with
``offload_activations`` so do the cached activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .calibrate import BlockCall, StatsCollector, capture_block_inputs, record_block_calls, run_block
from .metrics.base import LayerStats, PruningMetric
from .metrics.pattern import SparsityPattern
from .models.adapter import LinearRef, ModelAdapter
from .runtime import PhaseTimer, place_model, streamed_blocks

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What pruning did to one linear layer, measured on its weights afterwards."""

    name: str
    block: int
    shape: tuple[int, int]
    target: float
    zeros: int
    numel: int
    notes: list[str] = field(default_factory=list)

    @property
    def sparsity(self) -> float:
        return self.zeros / self.numel


@dataclass
class Activations:
    """Calibration activations entering block ``index`` (n, seqlen, hidden), plus every block's call context."""

    hidden: torch.Tensor
    calls: list[BlockCall]
    index: int = 0


class SequentialPruner:
    def __init__(
        self,
        adapter: ModelAdapter,
        metric: PruningMetric,
        pattern: SparsityPattern,
        device: torch.device,
        batch_size: int = 8,
        offload: bool = False,
        offload_activations: bool = False,
        timer: PhaseTimer | None = None,
        progress: bool = True,
    ):
        self.adapter = adapter
        self.metric = metric
        self.pattern = pattern
        self.device = device
        self.batch_size = batch_size
        self.offload = offload
        self.store = torch.device("cpu") if offload_activations else device
        self.timer = timer or PhaseTimer(device)
        self.progress = progress
        self.dtype = next(adapter.model.parameters()).dtype
        place_model(adapter.model, adapter.blocks_name, device, offload)

    # ------------------------------------------------------------------------------------------- activations
    def capture(self, input_ids: torch.Tensor) -> Activations:
        """Record every block's call context and the hidden states entering block 0."""
        with self.timer.phase("capture"):
            with streamed_blocks(self.adapter.blocks, self.device, self.offload):
                calls = record_block_calls(self.adapter, input_ids[:1])
            hidden = capture_block_inputs(self.adapter, input_ids, self.batch_size, self.store, self.dtype)
            if self.store.type == "cpu" and self.device.type == "cuda":
                hidden = hidden.pin_memory()
        return Activations(hidden, calls)

    def _block_on_device(self, index: int):
        block = self.adapter.blocks[index]
        if self.offload:
            block.to(self.device)
        return block

    def _release(self, index: int) -> None:
        if self.offload:
            self.adapter.blocks[index].to("cpu")

    def collect_stats(self, acts: Activations, layers: list[LinearRef], sq_norm: bool = False) -> dict[str, LayerStats]:
        """Statistics of ``layers`` (all in block ``acts.index``) from one forward over the cached inputs: what
        the metric needs, plus ``sq_norm`` when asked (redundancy needs it whatever the metric)."""
        block = self.adapter.blocks[acts.index]
        call = acts.calls[acts.index].to(self.device)
        with self.timer.phase("statistics"):
            want_sq_norm = sq_norm or self.metric.needs_sq_norm
            with StatsCollector(layers, want_sq_norm, self.metric.needs_hessian) as collector:
                run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=False)
        return collector.result()

    def advance(self, acts: Activations, observe: bool = False, phase: str = "recompute") -> dict[str, LayerStats]:
        """Replace the cached inputs of block ``acts.index`` by its outputs (current weights); with ``observe``
        also return every layer's input ``sq_norm`` seen on the way (one forward for both)."""
        index = acts.index
        block = self.adapter.blocks[index]
        call = acts.calls[index].to(self.device)
        with self.timer.phase(phase):
            if observe:
                with StatsCollector(self.adapter.linear_layers(index), sq_norm=True, hessian=False) as collector:
                    run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=True)
            else:
                run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=True)
        acts.index += 1
        return collector.result() if observe else {}

    def observe(self, input_ids: torch.Tensor) -> dict[str, LayerStats]:
        """Input ``sq_norm`` of every decoder linear layer of the model as it is now, without pruning."""
        acts = self.capture(input_ids)
        stats: dict[str, LayerStats] = {}
        for index in tqdm(range(self.adapter.num_blocks), desc="statistics", unit="block", disable=not self.progress):
            self._block_on_device(index)
            try:
                stats.update(self.advance(acts, observe=True, phase="dense statistics"))
            finally:
                self._release(index)
        return stats

    # ------------------------------------------------------------------------------------------------ prune
    def prune_layers(
        self, layers: list[LinearRef], targets: dict[str, float], stats: dict[str, LayerStats]
    ) -> list[LayerRecord]:
        """Prune each layer to its target. Weights that are already zero count as pruned (masks nest)."""
        records = []
        with self.timer.phase("masks"):
            for ref in layers:
                weight = ref.weight.to(torch.float32)
                layer_stats = stats.get(ref.name, LayerStats())
                result = self.metric.prune(weight, layer_stats, targets[ref.name], self.pattern, forced=weight == 0)
                ref.set_weight(result.weight)
                zeros = int((ref.weight == 0).sum())
                records.append(
                    LayerRecord(ref.name, ref.block, tuple(ref.weight.shape), targets[ref.name], zeros, ref.numel,
                                list(layer_stats.notes))
                )
        return records

    def prune_block(self, acts: Activations, targets: dict[str, float]) -> list[LayerRecord]:
        """Prune block ``acts.index`` (statistics from the cached inputs) and advance the activations."""
        index = acts.index
        layers = self.adapter.linear_layers(index)
        self._block_on_device(index)
        try:
            stats = self.collect_stats(acts, layers) if self.metric.needs_calibration else {}
            records = self.prune_layers(layers, targets, stats)
            del stats
            self.advance(acts)
        finally:
            self._release(index)
        return records

    def run(self, input_ids: torch.Tensor | None, targets: dict[str, float]) -> list[LayerRecord]:
        """Prune every block to the per-layer ``targets`` (qualified layer name -> sparsity)."""
        if not self.metric.needs_calibration:
            return self._run_without_calibration(targets)
        acts = self.capture(input_ids)
        records: list[LayerRecord] = []
        blocks = range(self.adapter.num_blocks)
        for _ in tqdm(blocks, desc=f"pruning ({self.metric.name})", unit="block", disable=not self.progress):
            records += self.prune_block(acts, targets)
        return records

    def _run_without_calibration(self, targets: dict[str, float]) -> list[LayerRecord]:
        records: list[LayerRecord] = []
        for index in tqdm(range(self.adapter.num_blocks), desc=f"pruning ({self.metric.name})", unit="block",
                          disable=not self.progress):
            self._block_on_device(index)
            try:
                records += self.prune_layers(self.adapter.linear_layers(index), targets, {})
            finally:
                self._release(index)
        return records
