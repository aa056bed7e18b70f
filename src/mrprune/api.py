"""The Python API: one call per job. The CLI is a thin wrapper over these functions."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from .allocate import AllocationContext, IterativeAllocator, build_allocator
from .config import PruneConfig
from .data import load_eval_text, read_corpus, sample_calibration
from .errors import ConfigError
from .evaluate import zeroshot as zs
from .evaluate.perplexity import PerplexityResult, perplexity
from .export import check_output, export_model
from .metrics import build_metric
from .metrics.pattern import SparsityPattern
from .models.adapter import ModelAdapter, get_adapter
from .models.loading import load_model, resolve_device
from .report import PruneReport
from .runner import SequentialPruner
from .runtime import PhaseTimer, peak_device_memory_mib, peak_host_memory_mib, place_model, streamed_blocks

log = logging.getLogger(__name__)


@dataclass
class PruneOutcome:
    model: torch.nn.Module
    tokenizer: object
    report: PruneReport
    output: Path | None = None


def model_summary(adapter: ModelAdapter, source: str) -> dict:
    layers = adapter.all_linear_layers()
    return {
        "source": source,
        "family": adapter.family,
        "class": type(adapter.model).__name__,
        "blocks": adapter.num_blocks,
        "linear_layers_per_block": len(adapter.linear_layers(0)),
        "decoder_linear_weights": sum(ref.numel for ref in layers),
        "total_parameters": sum(p.numel() for p in adapter.model.parameters()),
        "dtype": str(next(adapter.model.parameters()).dtype).replace("torch.", ""),
    }


def resolve_target(config: PruneConfig, pattern: SparsityPattern) -> float | None:
    """The global target: explicit, implied by an N:M pattern, left to the allocator (file), or 0.5."""
    if config.sparsity is not None:
        return config.sparsity
    if pattern.is_nm:
        return pattern.sparsity
    return None if config.allocation.method == "file" else 0.5


def check_pattern(adapter: ModelAdapter, pattern: SparsityPattern) -> None:
    for ref in adapter.all_linear_layers():
        pattern.check_layer(ref.name, ref.in_features)


def _load(model, tokenizer, config: PruneConfig):
    """(model, tokenizer, description, local source dir) for a model object, a path/id, or None (default)."""
    if model is None or isinstance(model, (str, Path)):
        spec = str(model) if model is not None else config.model
        r = config.runtime
        loaded = load_model(spec, r.dtype, r.device, r.trust_remote_code, r.allow_pickle)
        return loaded.model, loaded.tokenizer, loaded.source, loaded.local_dir
    source = getattr(getattr(model, "config", None), "_name_or_path", "") or type(model).__name__
    local = Path(source) if source and Path(source).is_dir() else None
    return model, tokenizer, source, local


def prune(model=None, config: PruneConfig | None = None, *, tokenizer=None, progress: bool = True,
          calibration_ids: torch.Tensor | None = None) -> PruneOutcome:
    """Prune ``model`` (a loaded HF model, a path or hub id, or None for ``config.model``) as ``config`` says.

    An in-memory model is pruned in place; files it was loaded from are never written. With
    ``config.output`` the result is exported there, report included. ``calibration_ids`` (n x seqlen token
    ids) replaces the sampling of ``config.calibration`` when given.
    """
    config = (config or PruneConfig()).validate()
    device = resolve_device(config.runtime.device)
    timer = PhaseTimer(device)
    pattern = SparsityPattern.parse(config.pattern)
    zeroshot_tasks = None
    if config.evaluation.tasks:
        with timer.phase("zeroshot"):  # a missing lm-eval, task or task data fails here, before any heavy work
            zeroshot_tasks = zs.prepare_tasks(config.evaluation.tasks, config.evaluation.task_data)
    with timer.phase("load"):
        model, tokenizer, source, source_dir = _load(model, tokenizer, config)
    adapter = get_adapter(model)
    check_pattern(adapter, pattern)
    if config.output is not None:
        check_output(config.output, config.overwrite, source_dir)
    metric = build_metric(config.metric, config)
    allocator = build_allocator(config.allocation.method, config)
    needs_calibration = metric.needs_calibration or allocator.needs_calibration
    if (needs_calibration and calibration_ids is None or config.evaluate or zeroshot_tasks) and tokenizer is None:
        raise ConfigError("a tokenizer is needed for calibration and evaluation; pass tokenizer=...")

    calib_ids = None
    eval_corpus = None
    with timer.phase("data"):
        if needs_calibration and calibration_ids is not None:
            calib_ids = calibration_ids
        elif needs_calibration:
            corpus = read_corpus(config.calibration.source, "calibration", config.calibration.column)
            c = config.calibration
            calib_ids = sample_calibration(corpus, tokenizer, c.nsamples, c.seqlen, c.seed)
            log.info("calibration: %d x %d tokens from %s (seed %d)", c.nsamples, c.seqlen, corpus.name, c.seed)
        if config.evaluate:
            eval_corpus = load_eval_text(config.evaluation.text)

    runner = SequentialPruner(
        adapter, metric, pattern, device, config.runtime.batch_size, config.runtime.offload,
        config.runtime.offload_activations, timer, progress,
    )

    def measure() -> PerplexityResult:
        e = config.evaluation
        with timer.phase("evaluation"), streamed_blocks(adapter.blocks, device, config.runtime.offload):
            return perplexity(model, tokenizer, eval_corpus, e.seqlen, e.max_windows, e.bos, device, progress)

    ppl = {}
    if config.evaluate:
        ppl["before"] = measure().to_dict()
    dense_stats = runner.observe(calib_ids) if allocator.needs_calibration else None
    ctx = AllocationContext(adapter, resolve_target(config, pattern), config.allocation.granularity, config,
                            dense_stats=lambda: dense_stats)
    if isinstance(allocator, IterativeAllocator):
        allocation, records = allocator.prune(ctx, runner, calib_ids)
    else:
        with timer.phase("allocation"):
            allocation = allocator.allocate(ctx)
        records = runner.run(calib_ids, allocation.whole_weight_targets(adapter))
    if config.evaluate:
        ppl["after"] = measure().to_dict()
    zeroshot = {}
    if zeroshot_tasks is not None:
        e = config.evaluation
        with timer.phase("zeroshot"), streamed_blocks(adapter.blocks, device, config.runtime.offload):
            zeroshot = zs.evaluate_zeroshot(model, tokenizer, zeroshot_tasks, e.limit, e.num_fewshot,
                                            e.batch_size).to_dict()

    report = PruneReport.build(
        model_summary(adapter, source), config.to_dict(), allocation, records,
        perplexity=ppl,
        zeroshot=zeroshot,
        memory_mib={"peak_host": round(peak_host_memory_mib(), 1), "peak_device": peak_device_memory_mib(device)},
    )
    report.timings_s = timer.as_dict()
    output = None
    if config.output is not None:
        written = report.to_dict()
        output = export_model(model, tokenizer, config.output, written, config.overwrite, source_dir)
        report.timings_s = written["timings_s"]
    return PruneOutcome(model, tokenizer, report, output)


def evaluate_perplexity(
    model,
    tokenizer=None,
    text: str | None = None,
    seqlen: int = 2048,
    max_windows: int | None = None,
    bos: str = "auto",
    device: str = "auto",
    dtype: str = "auto",
    offload: bool = False,
    progress: bool = True,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> PerplexityResult:
    """Perplexity of a model object or of the model at a path / hub id, on ``text`` (file, dataset or None)."""
    if model is None or isinstance(model, (str, Path)):
        loaded = load_model(None if model is None else str(model), dtype, device, trust_remote_code, allow_pickle)
        model, tokenizer = loaded.model, loaded.tokenizer
    corpus = load_eval_text(text)
    torch_device = resolve_device(device)
    adapter = get_adapter(model)
    place_model(model, adapter.blocks_name, torch_device, offload)
    with streamed_blocks(adapter.blocks, torch_device, offload):
        return perplexity(model, tokenizer, corpus, seqlen, max_windows, bos, torch_device, progress)


def evaluate_zeroshot(
    model,
    tokenizer=None,
    *,
    tasks: str | list[str] | zs.ZeroShotTasks,
    limit: int | None = None,
    num_fewshot: int = 0,
    batch_size: int = 1,
    task_data: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    offload: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> zs.ZeroShotResult:
    """Zero-shot accuracy (lm-evaluation-harness) of a model object or of the model at a path / hub id.

    Tasks, lm-eval and task data are checked before the model is loaded; ``task_data`` is a folder of local
    task files, used instead of the hub (see ``mrprune.evaluate.zeroshot.LOCAL_TASKS``).
    """
    prepared = tasks if isinstance(tasks, zs.ZeroShotTasks) else zs.prepare_tasks(tasks, task_data)
    if model is None or isinstance(model, (str, Path)):
        loaded = load_model(None if model is None else str(model), dtype, device, trust_remote_code, allow_pickle)
        model, tokenizer = loaded.model, loaded.tokenizer
    torch_device = resolve_device(device)
    adapter = get_adapter(model)
    place_model(model, adapter.blocks_name, torch_device, offload)
    with streamed_blocks(adapter.blocks, torch_device, offload):
        return zs.evaluate_zeroshot(model, tokenizer, prepared, limit, num_fewshot, batch_size)
