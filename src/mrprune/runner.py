"""The sequential pass: for each block, statistics from inputs produced by the already-pruned blocks above it,
then pruning, then recomputing its outputs with the pruned weights to feed the next block.

Only the current block needs to be on the accelerator; with ``offload`` the others wait on the CPU, and with
``offload_activations`` so do the cached activations.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from .calibrate import BlockCall, StatsCollector, capture_block_inputs, record_block_calls, run_block
from .checkpoint import Checkpoint
from .metrics.base import UNSEEN_NOTE, LayerStats, PruningMetric
from .metrics.pattern import SparsityPattern
from .models.adapter import ExpertRef, LinearRef, ModelAdapter, check_context, restore_weights, swap_weights
from .numerics import check_pruned_weight, check_stats, require_finite_activations
from .runtime import BlockMover, PhaseTimer, place_model
from .spill import SpillStore

log = logging.getLogger(__name__)


@dataclass
class LayerRecord:
    """What pruning did to one linear layer, measured on its weights afterwards."""

    name: str
    block: int
    shape: tuple[int, ...]
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


def is_expert(ref: LinearRef) -> bool:
    """One expert's matrix: of a fused experts tensor, or a module of an ``experts`` list."""
    return isinstance(ref, ExpertRef) or ".experts." in f".{ref.name}."


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
        checkpoint: Checkpoint | None = None,
        spill: SpillStore | None = None,
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
        #: where progress is saved after every finished block (and resumed from), if anywhere
        self.checkpoint = checkpoint
        self.dtype = next(adapter.model.parameters()).dtype
        #: calibration tokens that reached each layer when it was last pruned (an expert sees only its own)
        self.layer_tokens: dict[str, int] = {}
        #: every note a layer's pruning gave, over all the times it was pruned (MRP prunes a layer many times)
        self.layer_notes: dict[str, list[str]] = {}
        self._unread_said: set[str] = set()  # kinds of layer whose weight the model reads without calling them
        place_model(adapter.model, adapter.blocks_name, device, offload)
        #: with ``spill``, pruned blocks live in its files instead of the host's RAM
        self.mover = BlockMover(adapter.blocks, device, enabled=offload, spill=spill)

    # ------------------------------------------------------------------------------------------- activations
    def capture(self, input_ids: torch.Tensor) -> Activations:
        """Record every block's call context and the hidden states entering block 0."""
        with self.timer.phase("capture"):
            calls = self.record_calls(input_ids)
            hidden, finite = capture_block_inputs(self.adapter, input_ids, self.batch_size, self.store, self.dtype)
        require_finite_activations(finite, "entering block 0 (the embeddings' output)")
        return Activations(hidden, calls)

    def record_calls(self, input_ids: torch.Tensor) -> list[BlockCall]:
        """Every block's call context (masks, positions), from one forward of the first window (blocks
        bypassed, so offloaded blocks stay where they are)."""
        check_context(self.adapter.model, input_ids.shape[1], "a calibration window (--seqlen)")
        n = input_ids.shape[0]
        return record_block_calls(self.adapter, input_ids[:1], rows=(min(self.batch_size, n), n % self.batch_size))

    def resume(self, input_ids: torch.Tensor) -> Activations:
        """The saved activations entering the checkpoint's next block, with freshly recorded call contexts
        (they depend on the token positions only, not on the block weights)."""
        ckpt = self.checkpoint
        assert ckpt is not None and ckpt.progress is not None
        with self.timer.phase("capture"):
            calls = self.record_calls(input_ids)
            hidden = ckpt.load_activations().to(self.store, self.dtype)
            if self.store.type == "cpu" and self.device.type == "cuda":
                hidden = hidden.pin_memory()
        return Activations(hidden, calls, int(ckpt.progress["next_block"]))

    def _block_on_device(self, index: int):
        if self.offload:
            with self.timer.phase("block moves"):
                return self.mover.fetch(index)
        return self.adapter.blocks[index]

    def close(self) -> None:
        """Every offloaded block back on the host and no copy left on the device."""
        self.mover.close()

    def _release(self, index: int, changed: bool = True) -> None:
        """Block ``index`` back to the host; ``changed=False`` (a pass that only reads it) skips the copy."""
        if self.offload:
            with self.timer.phase("block moves"):
                self.mover.release(index, changed)

    def collect_stats(self, acts: Activations, layers: list[LinearRef], sq_norm: bool = False) -> dict[str, LayerStats]:
        """Statistics of ``layers`` (all in block ``acts.index``) from one forward over the cached inputs: what
        the metric needs, plus ``sq_norm`` when asked (redundancy needs it whatever the metric)."""
        block = self.adapter.blocks[acts.index]
        call = acts.calls[acts.index].to(self.device)
        with self.timer.phase("statistics"):
            want_sq_norm = sq_norm or self.metric.needs_sq_norm
            with StatsCollector(layers, want_sq_norm, self.metric.needs_hessian) as collector:
                run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=False)
            stats = collector.result()
            check_stats(stats, acts.index, [ref.name for ref in layers])
        return stats

    def advance(self, acts: Activations, observe: bool = False, phase: str = "recompute") -> dict[str, LayerStats]:
        """Replace the cached inputs of block ``acts.index`` by its outputs (current weights); with ``observe``
        also return every layer's input ``sq_norm`` seen on the way (one forward for both)."""
        index = acts.index
        block = self.adapter.blocks[index]
        call = acts.calls[index].to(self.device)
        with self.timer.phase(phase):
            if observe:
                with StatsCollector(self.adapter.linear_layers(index), sq_norm=True, hessian=False) as collector:
                    finite = run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=True)
            else:
                finite = run_block(block, call, acts.hidden, self.batch_size, self.device, write_back=True)
            require_finite_activations(finite, f"after block {index}")
            stats = collector.result() if observe else {}
            check_stats(stats, index)
        acts.index += 1
        return stats

    @contextlib.contextmanager
    def weights_of(self, index: int, weights: dict[str, torch.Tensor]):
        """Temporarily give block ``index``'s linear layers the given weights (e.g. its dense ones): swapped in
        as tensors of their own, so the block's own weights are neither copied nor written meanwhile."""
        swapped = swap_weights(self.adapter.linear_layers(index), weights)
        try:
            yield
        finally:
            restore_weights(swapped)

    def block_statistics(self, acts: Activations, index: int, hessian: bool = False,
                         dense_weights: dict[str, torch.Tensor] | None = None,
                         phase: str = "statistics") -> dict[str, LayerStats]:
        """Input statistics (``sq_norm``, optionally Hessians) of block ``index``'s layers over the activations
        entering it, without advancing them. With ``dense_weights`` the block runs with those meanwhile: its
        internal activations are then those of the dense block on the (pruned) upstream inputs."""
        layers = self.adapter.linear_layers(index)

        def collect() -> dict[str, LayerStats]:
            with self.timer.phase(phase), StatsCollector(layers, True, hessian) as collector:
                run_block(self.adapter.blocks[index], acts.calls[index].to(self.device), acts.hidden,
                          self.batch_size, self.device, write_back=False)
            stats = collector.result()
            check_stats(stats, index, [ref.name for ref in layers])
            return stats

        if dense_weights is None:
            return collect()
        with self.weights_of(index, dense_weights):
            return collect()

    def observe(self, input_ids: torch.Tensor,
                dense_weights: dict[str, torch.Tensor] | None = None) -> dict[str, LayerStats]:
        """Input ``sq_norm`` of every decoder linear layer of the model as it is now, without pruning. With
        ``dense_weights``, each block's internal activations come from its dense weights (see block_statistics)."""
        acts = self.capture(input_ids)
        stats: dict[str, LayerStats] = {}
        for index in tqdm(range(self.adapter.num_blocks), desc="statistics", unit="block", disable=not self.progress):
            self._block_on_device(index)
            try:
                if dense_weights is None:
                    stats.update(self.advance(acts, observe=True, phase="dense statistics"))
                else:
                    stats.update(self.block_statistics(acts, index, dense_weights=dense_weights))
                    self.advance(acts)
            finally:
                self._release(index, changed=False)  # only read (dense weights, if given, went in and back out)
        return stats

    # ------------------------------------------------------------------------------------------------ prune
    def prune_layers(
        self, layers: list[LinearRef], targets: dict[str, float], stats: dict[str, LayerStats]
    ) -> list[LayerRecord]:
        """Prune each layer to its target. Weights that are already zero count as pruned (masks nest)."""
        records = []
        last_use = {id(stats[ref.name]): ref.name for ref in layers if ref.name in stats}
        if self.mover.spill is not None:
            with self.timer.phase("block moves"):  # into the --offload-dir files, before the first write
                for block in sorted({ref.block for ref in layers}):
                    self.mover.prepare_host_write(block)
        unseen: list[LinearRef] = []
        with self.timer.phase("masks"):
            for ref in layers:
                weight = ref.weight.to(torch.float32)
                layer_stats = stats.get(ref.name, LayerStats())
                if self.metric.needs_calibration:
                    self.layer_tokens[ref.name] = layer_stats.tokens
                known_notes = len(layer_stats.notes)  # layers fed the same input share one LayerStats
                result = self.metric.prune(weight, layer_stats, targets[ref.name], self.pattern, forced=weight == 0)
                if last_use.get(id(layer_stats)) == ref.name:  # no later layer shares what it derived (H^-1)
                    layer_stats.derived.clear()
                check_pruned_weight(result.weight, ref.name, ref.block)
                ref.set_weight(result.weight)
                zeros = int((ref.weight == 0).sum())
                notes = list(layer_stats.notes[known_notes:])
                kept = self.layer_notes.setdefault(ref.name, [])
                fresh = [note for note in notes if note not in kept]
                kept += fresh
                if UNSEEN_NOTE in fresh:  # said once per layer, however often MRP re-prunes it
                    unseen.append(ref)
                records.append(
                    LayerRecord(ref.name, ref.block, tuple(ref.weight.shape), targets[ref.name], zeros, ref.numel,
                                notes)
                )
        self._warn_unseen(unseen, len(records))
        return records

    def _warn_unseen(self, unseen: list[LinearRef], of: int) -> None:
        """Say why layers were pruned without statistics: an expert its router never chose (more calibration
        reaches more experts), or a layer never called as a module (Mamba's dt_proj: the model's code multiplies
        by its weight directly, so no hook sees an input whatever the calibration; said once per kind of layer)."""
        experts = [r for r in unseen if is_expert(r)]
        if experts:
            log.warning("block %s: %d of %d layers (experts) got no calibration token and were pruned by magnitude; "
                        "more --nsamples reach more experts",
                        ",".join(str(b) for b in sorted({r.block for r in experts})), len(experts), of)
        others = sorted({r.short_name for r in unseen if not is_expert(r)} - self._unread_said)
        if others:
            self._unread_said.update(others)
            log.warning("%s (block %d on): never called as a module (the model's code reads the weight directly), "
                        "so no calibration statistics reach it: pruned by magnitude within each row",
                        ", ".join(others), min(r.block for r in unseen if r.short_name in others))

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

    def restore(self) -> tuple[int, list[LayerRecord]]:
        """With a checkpoint to resume from: its finished blocks' weights copied in; (next block, records)."""
        ckpt = self.checkpoint
        if ckpt is None or not ckpt.resuming:
            return 0, []
        assert ckpt.progress is not None
        self.close()  # no block copy in flight while the host weights are rewritten
        with self.timer.phase("resume"):
            ckpt.restore_weights(self.adapter, before_write=self.mover.prepare_host_write)
        records = ckpt.records()
        for record in records:
            self.layer_notes.setdefault(record.name, list(record.notes))
        return int(ckpt.progress["next_block"]), records

    def final_records(self) -> list[LayerRecord]:
        """Every layer as it is now, with all its notes: the records of an allocator that prunes layers more
        than once (MRP), whose targets are what the layers reached."""
        return [
            LayerRecord(ref.name, ref.block, tuple(ref.weight.shape), zeros / ref.numel, zeros, ref.numel,
                        list(self.layer_notes.get(ref.name, [])))
            for ref in self.adapter.all_linear_layers()
            for zeros in [int((ref.weight == 0).sum())]
        ]

    def save_progress(self, acts: Activations | None, block: int, records: list[LayerRecord],
                      stage: str = "prune", state: dict | None = None) -> None:
        """After block ``block`` is finished: its weights, the activations entering the next block, progress."""
        ckpt = self.checkpoint
        if ckpt is None:
            return
        with self.timer.phase("checkpoint"):
            ckpt.save_blocks(self.adapter, [block])
            last = block + 1 == self.adapter.num_blocks
            if acts is not None and not last:
                ckpt.save_activations(block + 1, acts.hidden)
            ckpt.commit(stage, range(block + 1), next_block=block + 1,
                        activations=None if acts is None or last else block + 1, records=records, state=state)

    def run(self, input_ids: torch.Tensor | None, targets: dict[str, float]) -> list[LayerRecord]:
        """Prune every block to the per-layer ``targets`` (qualified layer name -> sparsity); with a
        checkpoint, save progress after each block and continue from the saved one when resuming."""
        if not self.metric.needs_calibration:
            return self._run_without_calibration(targets)
        start, records = self.restore()
        if start >= self.adapter.num_blocks:
            return records
        assert input_ids is not None
        acts = self.resume(input_ids) if start else self.capture(input_ids)
        blocks = range(start, self.adapter.num_blocks)
        for index in tqdm(blocks, desc=f"pruning ({self.metric.name})", unit="block", disable=not self.progress):
            records += self.prune_block(acts, targets)
            self.save_progress(acts, index, records)
        return records

    def _run_without_calibration(self, targets: dict[str, float]) -> list[LayerRecord]:
        start, records = self.restore()
        for index in tqdm(range(start, self.adapter.num_blocks), desc=f"pruning ({self.metric.name})",
                          unit="block", disable=not self.progress):
            self._block_on_device(index)
            try:
                records += self.prune_layers(self.adapter.linear_layers(index), targets, {})
            finally:
                self._release(index)
            self.save_progress(None, index, records)
        return records
